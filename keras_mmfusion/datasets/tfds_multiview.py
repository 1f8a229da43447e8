"""A TensorFlow Datasets builder for multi-view ``.mat`` files.

Importing this module registers the builder ``mmf_multiview``. A dataset is described by
a :class:`MultiviewConfig` (its name, views and classes, how its labels are numbered and
how its test split is drawn), and its file ``<name>.mat`` is read from the download
config's ``manual_dir``::

    import tensorflow_datasets as tfds
    from keras_mmfusion.datasets.tfds_multiview import MultiviewConfig

    config = MultiviewConfig(name="handwritten", num_views=6, num_classes=10)
    builder = tfds.builder("mmf_multiview", config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data"))
    train = builder.as_dataset(split="train")

Each example is ``{"view_1": float32 (d_1,), ..., "view_K": ..., "label": int64}``. The
file is read and checked by :func:`keras_mmfusion.datasets.load_mat`; the test split is
the stratified ``test_fraction`` of every class drawn with ``split_seed``, the rows that
``mmfusion train --data <name>.mat`` tests on with the same options.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from keras_mmfusion.datasets.mat import load_mat
from keras_mmfusion.datasets.multiomics import stratified_split
from keras_mmfusion.datasets.tabular import DataError


class MultiviewConfig(tfds.core.BuilderConfig):
    """A multi-view ``.mat`` dataset: its views, classes, label numbering and test split."""

    def __init__(self, *, num_views, num_classes, label_base=None, test_fraction=0.2, split_seed=0, **kwargs):
        super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
        self.num_views = num_views
        self.num_classes = num_classes
        self.label_base = label_base
        self.test_fraction = test_fraction
        self.split_seed = split_seed


class MmfMultiview(tfds.core.GeneratorBasedBuilder):
    """Multi-view classification data from a MATLAB ``.mat`` file."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put the dataset's file, named <config name>.mat, in a folder and pass it as manual_dir.
    The file holds the views as a cell array X (or data, views, fea) and the labels as gt,
    Y, y, truth, gnd, label or labels; see keras_mmfusion.datasets.load_mat.
    """

    def _info(self):
        config = self.builder_config
        features = {f"view_{v}": tfds.features.Tensor(shape=(None,), dtype=np.float32)
                    for v in range(1, config.num_views + 1)}
        features["label"] = tfds.features.ClassLabel(num_classes=config.num_classes)
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        config = self.builder_config
        path = os.path.join(os.fspath(dl_manager.manual_dir), f"{config.name}.mat")
        inputs, labels = load_mat(path, label_base=config.label_base, verbose=0)
        if len(inputs) != config.num_views or labels.max() >= config.num_classes:
            raise DataError(f"{path}: {len(inputs)} views and {labels.max() + 1} classes, but config "
                            f"'{config.name}' declares {config.num_views} and {config.num_classes}.")
        keep, held = stratified_split(labels, config.test_fraction, config.split_seed)
        return {"train": self._generate_examples(inputs, labels, keep),
                "test": self._generate_examples(inputs, labels, held)}

    def _generate_examples(self, inputs, labels, rows):
        for row in rows:
            example = {f"view_{v + 1}": x[row] for v, x in enumerate(inputs)}
            example["label"] = int(labels[row])
            yield int(row), example
