"""The logical-axis rules table, free of jax so that config files can read it without starting jax (the
planner sets the fake device count, and the trainer starts jax.distributed, only after loading a config)."""

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated along that dimension).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def rules_to_strings(rules=DEFAULT_RULES) -> dict[str, str]:
    """{logical name: "axis" | "axis1,axis2" | ""}: the table in the config's string form (mesh.rules)."""
    out = {}
    for name, axes in rules:
        out[name] = axes if isinstance(axes, str) else ",".join(axes or ())
    return out


def rules_from_config(table) -> tuple:
    """The rules with the entries of `table` ({logical name: "fsdp" | "data,fsdp" | "" for replicated}) in
    place of the defaults; a one-line ValueError for an unknown logical name or mesh axis."""
    table = dict(table or {})
    unknown = sorted(set(table) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {unknown}; known: {list(LOGICAL_AXES)}")
    rules = []
    for name, default in DEFAULT_RULES:
        if name not in table:
            rules.append((name, default))
            continue
        axes = tuple(a.strip() for a in str(table[name]).split(",") if a.strip() and a.strip().lower() != "none")
        bad = [a for a in axes if a not in MESH_AXES]
        if bad or len(set(axes)) != len(axes):
            raise ValueError(f"mesh.rules.{name}={table[name]!r}: use mesh axes from {list(MESH_AXES)} "
                             f"(comma-separated, each once) or '' for replicated")
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)
