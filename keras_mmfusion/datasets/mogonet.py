"""The public MOGONET releases of ROSMAP and BRCA, from a local folder or downloaded once.

The MOGONET authors (Wang et al., Nature Communications 2021) released the preprocessed
ROSMAP and BRCA data in their repository, github.com/txWang/MOGONET, in the layout
:func:`~keras_mmfusion.datasets.load_multiomics` reads. :func:`mogonet_folder` finds
a dataset's folder in this order:

1. ``path=``, a folder that holds the files;
2. the environment variable ``MMFUSION_ROSMAP`` (``MMFUSION_BRCA``), for offline machines;
3. the Keras cache (``~/.keras/datasets/mmfusion_<name>``; ``KERAS_HOME`` moves it),
   where the files are downloaded with ``keras.utils.get_file`` on first use, each
   checked against its SHA-256 before it is kept.

Downloads come from one fixed commit of the repository, so the files and checksums
cannot change under a user. BRCA's large view files are not pinned by a checksum here, so
BRCA is read from a local folder only.
"""

import os

from keras_mmfusion.datasets.multiomics import load_multiomics
from keras_mmfusion.datasets.tabular import DataError

SOURCE = "https://raw.githubusercontent.com/txWang/MOGONET/9ed714f5c6f3e5a30178202e5d09d763fce67398"

# SHA-256 of every file of a release, as published at SOURCE.
CHECKSUMS = {
    "rosmap": {
        "1_tr.csv": "37bfcc58da320bf6c37b22617ed821dcfa96ca4abd334adf4d42c8e3375d972b",
        "1_te.csv": "d9d9daf05915556fd13008fb6ad7d88e0c5a8a57e5a985548640d4cd1563712b",
        "2_tr.csv": "b1d1d20f8793e5f11248218f19493d9a7be366ee5bbbaff585058401976f8a21",
        "2_te.csv": "546e9d7f640e54c4c1d6540ed2c1a3adb10497635e7d6b8d4099b4930271ac76",
        "3_tr.csv": "fd8708bc0c41f774209f9e6a49a74c5a9acd510dd62eadc299a18d49ccd9e862",
        "3_te.csv": "c0d9efd6c35e8c5768b759238c95c64674d7e1e7f76ed07fca6f168d67e676f4",
        "labels_tr.csv": "5859aa107dbf406937938ebefbec122d01fea5d41a9bd0292199f4406749e45d",
        "labels_te.csv": "20d728c6f51f79ff5fa7719b960daf22074a0e6e1f3028869042b02ca4e3f68d",
    },
}
FOLDERS = {"rosmap": "ROSMAP", "brca": "BRCA"}
NUM_CLASSES = {"rosmap": 2, "brca": 5}


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
            exist, BRCA without a local folder, or a download that fails or does not
            match its checksum (nothing is then kept in the cache).
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
    if name not in CHECKSUMS:
        raise DataError(f"{name} is read from a local folder only: pass path= or set ${variable}.")
    import keras

    # Keras's default cache root, created here: get_file would fall back to /tmp/.keras for a
    # root that does not exist yet. Named here so that a file failing its check can be removed.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    subdir = os.path.join("datasets", f"mmfusion_{name}")
    os.makedirs(os.path.join(cache_dir, subdir), exist_ok=True)
    for filename, checksum in CHECKSUMS[name].items():
        url = f"{source}/{FOLDERS[name]}/{filename}"
        try:
            keras.utils.get_file(filename, origin=url, file_hash=checksum, hash_algorithm="sha256",
                                 cache_dir=cache_dir, cache_subdir=subdir)
        except Exception as error:  # ValueError for a wrong checksum, Exception for a failed download
            target = os.path.join(cache_dir, subdir, filename)
            if os.path.exists(target):
                os.remove(target)
            raise DataError(f"{name}: could not download {url}: {error} (set ${variable} to a local copy)") from None
    return os.path.join(cache_dir, subdir)


def load_mogonet(name, split="train", path=None, source=SOURCE):
    """One split of MOGONET dataset ``name``: ``(list of (n, d) float32 views, int32 labels)``."""
    return load_multiomics(mogonet_folder(name, path, source), split, num_classes=NUM_CLASSES[name])


def load_rosmap(split="train", path=None):
    """ROSMAP (Alzheimer's disease against normal control; mRNA, DNA methylation, miRNA views
    of 200 features; 245 training and 106 test patients): one split, see :func:`mogonet_folder`."""
    return load_mogonet("rosmap", split, path)


def load_brca(split="train", path=None):
    """TCGA BRCA (5 PAM50 subtypes; mRNA, DNA methylation, miRNA views) from a local folder."""
    return load_mogonet("brca", split, path)
