"""Client side and shared core of dp-federated-lora-lab.

Models, data, LoRA arrays, privacy calibration and accounting, local DP-SGD training
and the Flower NumPyClient. Nothing here imports the server-side ``strategies``.
"""
