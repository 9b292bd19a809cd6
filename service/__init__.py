"""A TensorFlow-free Starlette + onnxruntime service for the car-model classifier."""
