"""The public MOGONET releases of ROSMAP and BRCA, from a local folder or downloaded on first use.

The MOGONET authors (Wang et al., Nature Communications 2021) released the preprocessed
ROSMAP and BRCA data in their repository, github.com/txWang/MOGONET, in the layout
:func:`~keras_mmfusion.datasets.load_multiomics` reads. :func:`mogonet_folder` finds
a dataset's folder in this order:

1. ``path=``, a folder that holds the files;
2. the environment variable ``MMFUSION_ROSMAP`` (``MMFUSION_BRCA``), for offline machines;
3. the Keras cache (``~/.keras/datasets/mmfusion_<name>``; ``KERAS_HOME`` moves it),
   where the files are downloaded with ``keras.utils.get_file`` on first use.

Downloads come from one fixed commit of the repository. Every file is checked, after
the download and on every later read of the cache, against its git object id in that
commit's tree: the SHA-1 of ``"blob <size>\\0"`` and the content, as ``git ls-tree -r``
and ``git hash-object`` print it, so anyone can audit the pins against the public
repository. A file that does not match is removed and named in the error.
"""

import hashlib
import os

from keras_mmfusion.datasets.multiomics import load_multiomics
from keras_mmfusion.datasets.tabular import DataError

SOURCE = "https://raw.githubusercontent.com/txWang/MOGONET/9ed714f5c6f3e5a30178202e5d09d763fce67398"

# The git object id of every file of a release in SOURCE's commit (`git ls-tree -r`).
CHECKSUMS = {
    "rosmap": {
        "1_tr.csv": "e35c70223b8506acf45ee46509356db39ea70ea4",
        "1_te.csv": "c52d01e785471c42a17f0aaeeae5c65822214978",
        "2_tr.csv": "64378292cd1ce30af3e2b4462e25de05f498fbc6",
        "2_te.csv": "c2cc6718934085d74a4260c6268e4f023dad7ce3",
        "3_tr.csv": "7a5e82a9a2d08b58be531c6c6e9dd657d956a626",
        "3_te.csv": "266f6f6292f1bf8305c20b9362bdb033d6bc5ea5",
        "labels_tr.csv": "535f5fa69c9b2e61f1f31ca6e278c24c5f033f63",
        "labels_te.csv": "6773b84fcd8e2526d020f7f7f3c9440290bff9c7",
    },
    "brca": {
        "1_tr.csv": "f9592a73980ecb37f332b7a6d9b57b5a99078090",
        "1_te.csv": "d34625f7875308260b4b83b584c5b8eeffd621da",
        "2_tr.csv": "c58c38acd33f14dd99295c6eb629cc56885af98e",
        "2_te.csv": "ac5dd437b58659090eb6934e7e3a4a9a52a4a553",
        "3_tr.csv": "08e7b9a8c490892df01a474973c3e53efc76beb7",
        "3_te.csv": "7f8a67831896b6302f446dca88f0aeac71103635",
        "labels_tr.csv": "500c4965cfb07b192ddee944a022d02e2481ef30",
        "labels_te.csv": "44fd92df634fa828e26c9a6766af640987a294ae",
    },
}
FOLDERS = {"rosmap": "ROSMAP", "brca": "BRCA"}
NUM_CLASSES = {"rosmap": 2, "brca": 5}


def git_object_id(path):
    """The id git gives a file's content: ``git hash-object path``."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def environment_variable(name):
    return f"MMFUSION_{name.upper()}"


def mogonet_folder(name, path=None, source=SOURCE):
    """The local folder of MOGONET dataset ``name`` (``"rosmap"`` or ``"brca"``).

    Args:
        name: the dataset.
        path: a folder holding its files; overrides the environment and the cache.
        source: the base URL downloads come from (a mirror, or a local server in tests).

    Raises:
        DataError: an unknown name, a ``path`` or environment folder that does not
            exist, or a download that fails or does not match its pinned object id
            (the file is then not kept in the cache).
    """
    if name not in FOLDERS:
        raise DataError(f"unknown MOGONET dataset {name!r}; expected one of {sorted(FOLDERS)}.")
    variable = environment_variable(name)
    local = path if path is not None else os.environ.get(variable)
    if local is not None:
        local = os.fspath(local)
        if not os.path.isdir(local):
            origin = "path" if path is not None else f"${variable}"
            raise DataError(f"{local}: {name} data folder not found (from {origin}).")
        return local
    import keras

    # Keras's default cache root, created here: get_file would fall back to /tmp/.keras for a
    # root that does not exist yet. Named here so that a file failing its check can be removed.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    subdir = os.path.join("datasets", f"mmfusion_{name}")
    os.makedirs(os.path.join(cache_dir, subdir), exist_ok=True)
    for filename, checksum in CHECKSUMS[name].items():
        url = f"{source}/{FOLDERS[name]}/{filename}"
        target = os.path.join(cache_dir, subdir, filename)
        try:
            keras.utils.get_file(filename, origin=url, cache_dir=cache_dir, cache_subdir=subdir)
        except Exception as error:  # any failure of the download
            if os.path.exists(target):
                os.remove(target)
            raise DataError(f"{name}: could not download {url}: {error} (set ${variable} to a local copy)") from None
        found = git_object_id(target)
        if found != checksum:
            os.remove(target)
            raise DataError(f"{name}: {url} has git object id {found}, not the pinned {checksum}; the file was "
                            f"removed (set ${variable} to a local copy)")
    return os.path.join(cache_dir, subdir)


def load_mogonet(name, split="train", path=None, source=SOURCE):
    """One split of MOGONET dataset ``name``: ``(list of (n, d) float32 views, int32 labels)``."""
    return load_multiomics(mogonet_folder(name, path, source), split, num_classes=NUM_CLASSES[name])


def load_rosmap(split="train", path=None):
    """ROSMAP (Alzheimer's disease against normal control; mRNA, DNA methylation, miRNA views
    of 200 features; 245 training and 106 test patients): one split, see :func:`mogonet_folder`."""
    return load_mogonet("rosmap", split, path)


def load_brca(split="train", path=None):
    """TCGA BRCA (5 PAM50 breast-cancer subtypes; mRNA, DNA methylation, miRNA views of
    1000, 1000 and 503 features): one split, see :func:`mogonet_folder`."""
    return load_mogonet("brca", split, path)
