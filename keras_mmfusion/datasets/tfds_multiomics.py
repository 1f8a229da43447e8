"""A TensorFlow Datasets builder for multi-omics data in the MOGONET CSV layout.

Importing this module registers the builder ``mmf_multiomics`` with TFDS::

    import tensorflow_datasets as tfds
    import keras_mmfusion.datasets.tfds_multiomics  # noqa: F401 - registers the builder

    ds = tfds.load("mmf_multiomics/rosmap", split="train")

The files come from where :func:`keras_mmfusion.datasets.mogonet_folder` finds them: a
``manual_dir`` given in the download config, else ``$MMFUSION_ROSMAP``
(``$MMFUSION_BRCA``), else MOGONET's public release, downloaded into the Keras cache
on first use and checked file by file. A ``manual_dir`` serves offline machines::

    tfds.load("mmf_multiomics/brca", split="train", download_and_prepare_kwargs={
        "download_config": tfds.download.DownloadConfig(manual_dir="/data/brca")})

Each example is ``{"view_1": float32 (d_1,), ..., "view_K": ..., "label": int64}``. The
files are read and validated by :func:`keras_mmfusion.datasets.load_multiomics`, which
finds the views by listing the folder; a config only declares how many views and
classes the dataset has (TFDS feature dicts are fixed when the builder is made), and
the build stops with a clear error when the files disagree with it. The view widths are
not declared: each view is a variable-length vector, equal within a split.
"""

import numpy as np
import tensorflow_datasets as tfds

from keras_mmfusion.datasets.mogonet import mogonet_folder
from keras_mmfusion.datasets.multiomics import find_views, load_multiomics
from keras_mmfusion.datasets.tabular import DataError


class MultiomicsConfig(tfds.core.BuilderConfig):
    """A named multi-omics dataset: its number of views and classes."""

    def __init__(self, *, num_views, num_classes, **kwargs):
        super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
        self.num_views = num_views
        self.num_classes = num_classes


class MmfMultiomics(tfds.core.GeneratorBasedBuilder):
    """Multi-omics classification data in the MOGONET layout."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    ROSMAP is downloaded from the MOGONET repository when no folder is given. Otherwise,
    put the preprocessed files of one dataset in a folder and pass it as manual_dir:
    1_tr.csv, 1_te.csv, 2_tr.csv, ... (one view per number; headerless CSV, one sample a
    row) and labels_tr.csv, labels_te.csv (one integer class per row). The ROSMAP and BRCA
    files are published in the MOGONET repository (github.com/txWang/MOGONET), in its
    ROSMAP/ and BRCA/ folders.
    """
    BUILDER_CONFIGS = [
        MultiomicsConfig(
            name="rosmap", num_views=3, num_classes=2,
            description="ROSMAP: Alzheimer's disease vs normal control; mRNA, DNA methylation, miRNA.",
        ),
        MultiomicsConfig(
            name="brca", num_views=3, num_classes=5,
            description="TCGA BRCA: PAM50 breast-cancer subtypes; mRNA, DNA methylation, miRNA.",
        ),
    ]

    def _info(self):
        config = self.builder_config
        features = {
            f"view_{v}": tfds.features.Tensor(shape=(None,), dtype=np.float32)
            for v in range(1, config.num_views + 1)
        }
        features["label"] = tfds.features.ClassLabel(num_classes=config.num_classes)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/txWang/MOGONET",
        )

    def _split_generators(self, dl_manager):
        try:
            manual = str(dl_manager.manual_dir)
        except AssertionError:  # TFDS's answer when no manual_dir was given or it is empty
            manual = None
        folder = mogonet_folder(self.builder_config.name, manual)
        views = find_views(folder)
        if len(views) != self.builder_config.num_views:
            raise DataError(
                f"{folder}: found {len(views)} views {views}, but config "
                f"'{self.builder_config.name}' declares {self.builder_config.num_views}."
            )
        return {
            "train": self._generate_examples(folder, "train"),
            "test": self._generate_examples(folder, "test"),
        }

    def _generate_examples(self, folder, split):
        inputs, labels = load_multiomics(folder, split, num_classes=self.builder_config.num_classes)
        for row, label in enumerate(labels):
            example = {f"view_{v + 1}": x[row] for v, x in enumerate(inputs)}
            example["label"] = int(label)
            yield row, example
