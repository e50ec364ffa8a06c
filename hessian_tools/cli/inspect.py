"""`hessian-tools inspect CKPT`: architecture, config, parameter count, step, measurement sites and their roles."""

from hessian_tools.cli.common import add_checkpoint_argument, add_model_flags


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="describe a checkpoint and list its measurement sites",
                              description=__doc__.splitlines()[0])
    add_checkpoint_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_flags(p)
    p.set_defaults(run=run)


def describe(ckpt) -> dict:
    """JSON-able summary of a loaded checkpoint."""
    from models.sites import list_sites, role_sites

    return {
        "path": str(ckpt.path),
        "format": ckpt.meta.get("format"),
        "layout": ckpt.meta.get("layout"),
        "settings_from": ckpt.settings_from,
        "arch": ckpt.config.arch,
        "config": ckpt.config.to_dict(),
        "n_params": sum(p.numel() for p in ckpt.model.parameters()),
        "step": ckpt.step,
        "sites": list_sites(ckpt.model),
        "roles": role_sites(ckpt.model),
    }


def run(args) -> int:
    import json

    from hessian_tools.cli.common import open_from_args

    info = describe(open_from_args(args))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    layout = f", {info['layout']}" if info["layout"] else ""
    print(f"checkpoint  {info['path']} ({info['format']}{layout})")
    print(f"arch        {info['arch']}")
    print(f"step        {info['step']}")
    print(f"parameters  {info['n_params']:,}")
    print("config      " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    job, overrides = info["settings_from"].get("job_config"), info["settings_from"].get("overrides")
    if job:
        print(f"job config  {job['path']} ({job['model_name']} {job['flavor']})")
    if overrides:
        print("overrides   " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    print(f"sites ({len(info['sites'])}):")
    for site in info["sites"]:
        print(f"  {site}")
    print("sites by role (--role ROLE --layer I; the same roles in every architecture):")
    for layer, roles in enumerate(info["roles"]):
        print(f"  layer {layer}: " + ", ".join(f"{role} = {site}" for role, site in roles.items()))
    return 0
