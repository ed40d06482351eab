"""Model packages, prediction on new images and MONAI bundle export (``medclust predict`` / ``export``)."""

from medclust.predict.apply import Predictor, predict_inputs, slice_inference
from medclust.predict.inputs import collect_inputs
from medclust.predict.package import FORMAT_VERSION, PACKAGE_FILE, ModelPackage, load_package, write_package
from medclust.predict.prepare import InputPreparer, PreparedInput
from medclust.predict.recipes import store_preprocessing, write_finetune_package, write_pretrain_package

__all__ = [
    "FORMAT_VERSION",
    "InputPreparer",
    "PACKAGE_FILE",
    "ModelPackage",
    "PreparedInput",
    "Predictor",
    "collect_inputs",
    "load_package",
    "predict_inputs",
    "slice_inference",
    "store_preprocessing",
    "write_finetune_package",
    "write_package",
    "write_pretrain_package",
]
