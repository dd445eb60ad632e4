"""Command line: `python -m xnemo_core {demo,animate,parity,convert,bench} ...`."""
from __future__ import annotations

import argparse
import sys


def _parity(args) -> int:
    from .parity import check_manifest, run_fixture_dir

    ok = True
    if args.manifest:
        report = check_manifest(args.manifest)
        print("\n".join(report.lines))
        print("manifest:", "PASS" if report.ok else "FAIL")
        ok &= report.ok
    if args.fixture:
        passed, comparisons = run_fixture_dir(args.fixture, only=args.case or None)
        checked = [c for c in comparisons if c.checked]
        print(f"fixtures: {'PASS' if passed else 'FAIL'} ({sum(c.ok for c in checked)}/{len(checked)} checked tensors within tolerance)")
        ok &= passed
    if not (args.manifest or args.fixture):
        print("nothing to check: give --fixture DIR and/or --manifest FILE", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _convert(args) -> int:
    from .checkpoints import OfficialPaths, load_official, resolve_dtype, save_bundle

    paths = OfficialPaths.from_folder(args.official, base_dir=args.base, vae_dir=args.vae)
    models = load_official(paths)
    save_bundle(models, args.out, dtype=resolve_dtype(args.dtype))
    print(f"wrote {args.out} ({sum(models.parameter_count().values()) / 1e9:.2f}B parameters, {args.dtype}); "
          "licence: CC BY-NC 4.0 (official X-NeMo weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xnemo_core", description="X-NeMo portrait animation engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="check numerical parity with the official release")
    p.add_argument("--fixture", help="fixture directory (cases *.json + *.safetensors)")
    p.add_argument("--manifest", help="official checkpoint key manifest (official_checkpoint_keys.json)")
    p.add_argument("--case", action="append", help="only run this case (repeatable)")
    p.set_defaults(func=_parity)

    p = sub.add_parser("convert", help="official release -> one safetensors bundle")
    p.add_argument("--official", required=True, help="folder with xnemo_*.pth")
    p.add_argument("--base", help="sd-image-variations-diffusers folder (unet/, image_encoder/)")
    p.add_argument("--vae", help="stable-video-diffusion-img2vid-xt/vae folder")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.set_defaults(func=_convert)

    from . import cli_animate

    cli_animate.add_commands(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
