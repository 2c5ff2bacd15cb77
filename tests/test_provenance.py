"""The kernel-source hash (natten_jax/provenance.py): what it depends on, the git form, the
build's header, and the module's copy."""
import os
import shutil
import subprocess

import pytest

from natten_jax import _ffi, provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


FILES = {"src/cuda/a.cu": "kernel a\n", "src/cuda/include/b.cuh": "header b\n",
         "README.md": "not a kernel source\n"}


def test_hash_depends_on_paths_and_contents_of_src_cuda_only(tmp_path):
    a = _tree(tmp_path / "a", FILES)
    h = provenance.kernel_sources_hash(a)
    assert len(h) == provenance.DIGITS and int(h, 16) >= 0
    assert provenance.kernel_sources_hash(_tree(tmp_path / "b", FILES)) == h  # root-independent
    _tree(tmp_path / "a", {"README.md": "changed\n"})  # outside src/cuda: no change
    assert provenance.kernel_sources_hash(a) == h
    _tree(tmp_path / "a", {"src/cuda/a.cu": "kernel a, edited\n"})
    edited = provenance.kernel_sources_hash(a)
    assert edited != h
    os.rename(os.path.join(a, "src/cuda/a.cu"), os.path.join(a, "src/cuda/c.cu"))
    assert provenance.kernel_sources_hash(a) not in (h, edited)  # a rename counts
    with pytest.raises(FileNotFoundError):
        provenance.kernel_sources_hash(str(tmp_path))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_hash_at_a_commit_is_the_hash_of_that_tree(tmp_path):
    repo = _tree(tmp_path / "repo", FILES)

    def git(*args):
        subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    first = provenance.kernel_sources_hash(repo)
    _tree(repo, {"src/cuda/include/b.cuh": "header b, edited\n"})
    git("commit", "-qam", "two")
    assert provenance.kernel_sources_hash_at("HEAD~1", repo) == first
    assert provenance.kernel_sources_hash_at("HEAD", repo) == provenance.kernel_sources_hash(repo)
    assert provenance.main(["--commit", "HEAD~1", repo]) == 0


def test_header_is_rewritten_only_when_the_hash_changes(tmp_path):
    root = _tree(tmp_path / "r", FILES)
    header = str(tmp_path / "gen" / "h.h")
    assert provenance.write_header(header, root)
    text = open(header).read()
    assert f'#define {provenance.DEFINE} "{provenance.kernel_sources_hash(root)}"' in text
    assert not provenance.write_header(header, root)  # same sources: untouched (no rebuild)
    _tree(root, {"src/cuda/a.cu": "other\n"})
    assert provenance.write_header(header, root) and open(header).read() != text


@pytest.mark.skipif(not _ffi.module_available(), reason="no compiled module")
def test_the_module_names_the_sources_it_was_built_from():
    """The build wrote this checkout's hash into the module (a stale module fails here)."""
    built = _ffi.kernel_sources()
    if not built:
        pytest.skip("module built before natten_jax/provenance.py existed")
    assert built == provenance.kernel_sources_hash(ROOT)


def test_benchmark_records_carry_the_hashes():
    from benchmarks.bench_na import kernel_provenance

    info = kernel_provenance()
    assert info["kernel_sources_tree"] == provenance.kernel_sources_hash(ROOT)
    assert info["kernel_sources"] == (_ffi.kernel_sources() or None)
