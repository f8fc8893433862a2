"""Test set-up: JAX sees 8 CPU devices, so sharding code runs as on a pod.

XLA reads the flag once, when JAX is first imported, so it is set here before
any test module imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
