"""Export a trained Keras classifier to a parity-checked, quantized ONNX artifact (the only TensorFlow user).

Importing this package imports no TensorFlow; the modules that need it import it themselves.
"""
