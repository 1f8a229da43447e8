"""Export a saved Keras model to SavedModel, TFLite or ONNX.

    python export/export_model.py --model runs/train/model.keras --format tflite [--quantize int8]

A thin wrapper: the same code runs as ``mmfusion export``; see ``--help``.
"""

import sys

from keras_mmfusion_cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
