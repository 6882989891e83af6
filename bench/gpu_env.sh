# Sourced by the device-call scripts (bench/gpu_run.sh, bench/gpu_run_e8p.sh) on the GPU machine, from the
# repository root with $OUT set: installs peers carried as wheels in .whl/ (bitsandbytes), puts src/ on
# PYTHONPATH, and records the card's clocks, power and temperature in $OUT/nvidia-smi.csv.
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1
