"""What a recipe's ``student.config`` may say: the settings of transformers' config class for its
``model_type``. A config class keeps any other keyword as an attribute that nothing reads, so a
typo (``n_embed`` for GPT-2's ``n_embd``) would build a student of the default width, silently
(two GPT-2 layers: 14.3M parameters instead of 28,832)."""

from __future__ import annotations

import difflib
import inspect

from potstill.errors import PotstillError

# read by PreTrainedConfig.__post_init__ itself (transformers 5), though in no class's signature:
# the dtype's old name, the RoPE keys of configs before rope_parameters (where the class has
# rope_parameters to put them in), the attention / experts kernels, the number of labels
READ_BY_BASE = {"torch_dtype", "attn_implementation", "experts_implementation", "num_labels"}
LEGACY_ROPE = {"rope_theta", "rope_scaling", "partial_rotary_factor"}


def known_keys(config_class) -> set[str]:
    """The keys ``config_class`` reads: its __init__ signature (in transformers 5 its fields, the
    base PreTrainedConfig's included), its attribute_map aliases (GPT-2's hidden_size -> n_embd),
    the keys of the base's and its own default to_dict(), the public properties it can set, and
    READ_BY_BASE."""
    from transformers import PretrainedConfig

    keys = {name for name, p in inspect.signature(config_class.__init__).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    keys |= set(getattr(config_class, "attribute_map", {}))
    keys |= set(PretrainedConfig().to_dict())
    try:
        keys |= set(config_class().to_dict())
    except Exception:  # a class that cannot be built without arguments: its signature says enough
        pass
    keys |= {name for klass in config_class.__mro__ for name, value in vars(klass).items()
             if isinstance(value, property) and value.fset is not None and not name.startswith("_")}
    keys |= READ_BY_BASE | (LEGACY_ROPE if "rope_parameters" in keys else set())
    return keys


def check_student_config(config: dict, source: str) -> None:
    """Refuse, in one line naming ``student.config.<key>``, a model_type transformers does not know
    and a key its config class does not read (with the closest one it does)."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise PotstillError(f"{source}: student.config.model_type: {model_type!r} is not a model type transformers "
                            f"{transformers.__version__} knows{hint}")
    config_class = CONFIG_MAPPING[model_type]
    known = known_keys(config_class)
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; remove it"
            raise PotstillError(f"{source}: student.config.{key}: not a setting of {config_class.__name__} "
                                f"({model_type}), which would keep it unread{hint}")
