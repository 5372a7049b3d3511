set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python3 -c "import cupy; print(cupy.__version__); from cupy_backends.cuda.libs import nvrtc; print(nvrtc.getVersion())"
PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 400 python3 -m pytest tests/test_gpu_forward.py -x -q -k "not forward_matches and not every_arch" 2>&1 | tail -30
PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 300 python3 -m pytest tests/test_gpu_forward.py -x -q -k "forward_matches" --hypothesis-show-statistics 2>&1 | tail -30
