# GPU test pass on the device machine: the whole suite, then report --selftest.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -m portattn report | head -8 | tee $OUT/report_head.txt
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-device} timeout ${TEST_TIMEOUT:-400} python3 -m pytest tests -q -p no:cacheprovider --hypothesis-show-statistics 2>&1 | tee $OUT/pytest.txt | grep -v "^  /\|Warning\|warnings.html\|^$" | tail -40
timeout 200 python3 -m portattn report --selftest 2>&1 | tail -45 | tee $OUT/selftest.txt
