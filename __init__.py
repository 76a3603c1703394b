"""medblip-edge: deploy MedBLIP (3D MRI + text -> diagnosis) with ONNX Runtime, TensorRT and PyTorch."""

__version__ = "0.1.0"
