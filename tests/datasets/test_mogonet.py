"""MOGONET data: a local folder, the environment, or a checked download into the Keras cache.

The downloads come from a local HTTP server on 127.0.0.1 that serves the ROSMAP files
of ``../shared/data/rosmap`` in the repository's layout; no test reaches the internet.
"""

import functools
import http.server
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest

from keras_mmfusion.datasets import DataError, load_mogonet, load_multiomics, mogonet_folder
from keras_mmfusion.datasets.mogonet import CHECKSUMS, git_object_id

ROSMAP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "rosmap")
pytestmark = pytest.mark.skipif(not os.path.isdir(ROSMAP), reason=f"ROSMAP data not found at {ROSMAP}")


class Server:
    """A static file server on 127.0.0.1 that records the paths requested."""

    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def release(tmp_path):
    """The repository layout (``ROSMAP/<file>``) under a served root."""
    root = tmp_path / "served"
    shutil.copytree(ROSMAP, root / "ROSMAP")
    return root


@pytest.fixture
def server(release):
    running = Server(str(release))
    yield running
    running.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("MMFUSION_ROSMAP", raising=False)
    return tmp_path / "keras" / "datasets" / "mmfusion_rosmap"


def test_download_checks_every_file_and_a_second_call_reads_the_cache(server, cache):
    folder = mogonet_folder("rosmap", source=server.url)
    assert folder == str(cache)
    assert sorted(server.requests) == sorted(f"/ROSMAP/{name}" for name in CHECKSUMS["rosmap"])
    assert sorted(os.listdir(cache)) == sorted(CHECKSUMS["rosmap"])
    x, y = load_mogonet("rosmap", "train", source=server.url)
    assert [a.shape for a in x] == [(245, 200)] * 3 and len(server.requests) == 8
    reference, labels = load_multiomics(ROSMAP, "train")
    np.testing.assert_array_equal(x[1], reference[1])
    np.testing.assert_array_equal(y, labels)


def test_a_file_with_the_wrong_checksum_is_an_error_and_is_not_kept(release, cache):
    with open(release / "ROSMAP" / "labels_te.csv", "a") as f:
        f.write("1\n")
    server = Server(str(release))
    try:
        with pytest.raises(DataError, match=r"rosmap: http://127.0.0.1:\d+/ROSMAP/labels_te.csv has git object id "
                                            r"[0-9a-f]{40}, not the pinned 6773b84fcd8e2526d020f7f7f3c9440290bff9c7; "
                                            r"the file was removed"):
            mogonet_folder("rosmap", source=server.url)
    finally:
        server.close()
    assert not (cache / "labels_te.csv").exists()
    assert (cache / "labels_tr.csv").exists()  # the files before it passed their checks


def test_an_unreachable_source_is_an_error_that_names_the_offline_option(cache):
    closed = Server(ROSMAP)
    url = closed.url
    closed.close()
    with pytest.raises(DataError, match=r"could not download .* \(set \$MMFUSION_ROSMAP to a local copy\)"):
        mogonet_folder("rosmap", source=url)
    assert not cache.exists() or not os.listdir(cache)


def test_a_local_folder_or_the_environment_needs_no_download(server, cache, monkeypatch):
    assert mogonet_folder("rosmap", path=ROSMAP, source=server.url) == ROSMAP
    monkeypatch.setenv("MMFUSION_ROSMAP", ROSMAP)
    x, _ = load_mogonet("rosmap", "test", source=server.url)
    assert [a.shape for a in x] == [(106, 200)] * 3
    assert server.requests == []
    monkeypatch.setenv("MMFUSION_ROSMAP", "/nonexistent/rosmap")
    with pytest.raises(DataError, match=r"/nonexistent/rosmap: rosmap data folder not found \(from \$MMFUSION_ROSMAP\)"):
        mogonet_folder("rosmap", source=server.url)


def test_a_cached_file_that_changed_is_caught_on_the_next_read_and_downloaded_again(server, cache):
    mogonet_folder("rosmap", source=server.url)
    with open(cache / "2_te.csv", "r+") as f:
        f.write("9")
    with pytest.raises(DataError, match=r"ROSMAP/2_te.csv has git object id [0-9a-f]{40}, not the pinned c2cc6718"):
        mogonet_folder("rosmap", source=server.url)
    assert not (cache / "2_te.csv").exists() and len(server.requests) == 8
    mogonet_folder("rosmap", source=server.url)
    assert server.requests[8:] == ["/ROSMAP/2_te.csv"]


def test_the_pins_are_gits_object_ids(tmp_path):
    path = tmp_path / "file.csv"
    path.write_bytes(b"0.5,1\n2,3\n")
    done = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_object_id(path) == done.stdout.strip()


def test_brca_downloads_from_the_same_source_and_is_checked_the_same_way(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("MMFUSION_BRCA", raising=False)
    (tmp_path / "served" / "BRCA").mkdir(parents=True)
    for name in CHECKSUMS["brca"]:
        (tmp_path / "served" / "BRCA" / name).write_text("0\n")
    server = Server(str(tmp_path / "served"))
    try:
        with pytest.raises(DataError, match=r"brca: http://127.0.0.1:\d+/BRCA/1_tr.csv has git object id "
                                            r"[0-9a-f]{40}, not the pinned f9592a73980e"):
            mogonet_folder("brca", source=server.url)
    finally:
        server.close()
    assert server.requests == ["/BRCA/1_tr.csv"]
    assert os.listdir(tmp_path / "keras" / "datasets" / "mmfusion_brca") == []


def test_the_tfds_builder_reads_the_same_source(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    import keras_mmfusion.datasets.tfds_multiomics  # noqa: F401 - registers the builder

    monkeypatch.setenv("MMFUSION_ROSMAP", ROSMAP)
    info = tfds.builder("mmf_multiomics/rosmap", data_dir=str(tmp_path))
    info.download_and_prepare()
    assert info.info.splits["train"].num_examples == 245 and info.info.splits["test"].num_examples == 106
