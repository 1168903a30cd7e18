import pytest

from potstill.errors import PotstillError
from potstill.recipe import load_recipe, parse_override

from helpers import QUICKSTART

RECIPE = QUICKSTART / "recipe.yaml"


def test_quickstart_recipe_loads_with_paths_resolved_against_its_folder():
    r = load_recipe(RECIPE)
    assert r.teacher.path == str((QUICKSTART / "teacher").resolve())
    assert r.eval.prompts == str((QUICKSTART / "prompts" / "heldout.jsonl").resolve())
    assert r.output_dir == "runs/quickstart"  # outputs stay relative to the current directory
    assert r.baseline.objective == "sft"


def test_overrides_are_typed_from_yaml():
    r = load_recipe(RECIPE, ["train.epochs=3", "train.temperature=1.5", "prompts.limit=null", "student.config.hidden_size=32"])
    assert r.train.epochs == 3 and r.train.temperature == 1.5 and r.prompts.limit is None
    assert r.student.config["hidden_size"] == 32
    assert parse_override("name=a=b") == ("name", "a=b")


@pytest.mark.parametrize("override, expected", [
    (["train.epoch=3"], "override train.epoch: unknown key; did you mean train.epochs?"),
    (["train.kd_ratio=1.5"], "train.kd_ratio: Input should be less than or equal to 1 (got 1.5)"),
    (["train.epochs=many"], "train.epochs: Input should be a valid integer"),
    (["train.objective=dpo"], "train.objective: Input should be 'kd' or 'sft'"),
    (["train.loss=reverse_klx"], "train.loss: Input should be 'forward_kl', 'reverse_kl'"),
    (["epochs"], "override 'epochs' is not key=value"),
    (["eval.verifier=nope"], "eval.verifier 'nope' is not installed; available: exact, skillmix"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(PotstillError) as err:
        load_recipe(RECIPE, override)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_and_missing_section_in_the_file(tmp_path):
    text = RECIPE.read_text().replace("  kd_ratio:", "  kd_ration:")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(PotstillError, match=r"r.yaml: unknown key train.kd_ration; did you mean train.kd_ratio\?"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "s.yaml").write_text("teacher: {path: t}\nprompts: {path: p}\nstudent: {path: s}\n")
    with pytest.raises(PotstillError, match=r"s.yaml: eval is required"):
        load_recipe(tmp_path / "s.yaml")


def test_student_needs_exactly_one_source(tmp_path):
    with pytest.raises(PotstillError, match="exactly one of student.config"):
        load_recipe(RECIPE, ["student.path=somewhere"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PotstillError, match="recipe .*nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  path: [unclosed\nstudent: 1\n")
    with pytest.raises(PotstillError, match=r"bad.yaml line \d+: not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(PotstillError, match="YAML mapping"):
        load_recipe(bad)


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    """A billion-laughs recipe (1 KB, gigabytes once expanded by validation and hashing) is refused
    at its first alias, as is any alias: recipes are written out, not referenced."""
    import time

    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text(RECIPE.read_text() + "lols:\n" + "".join("  " + line + "\n" for line in bomb.splitlines()))
    start = time.perf_counter()
    with pytest.raises(PotstillError, match=r"bomb.yaml line \d+: YAML aliases \(\*a\) are not allowed in a recipe"):
        load_recipe(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 2
    text = RECIPE.read_text().replace("terms_family: apache-2.0", "terms_family: &terms apache-2.0")
    (tmp_path / "small.yaml").write_text(text.replace("  license: apache-2.0", "  license: *terms"))
    with pytest.raises(PotstillError, match=r"small.yaml line \d+: YAML aliases \(\*terms\)"):
        load_recipe(tmp_path / "small.yaml")
    assert load_recipe(RECIPE, ["name=[&x 1, *x]"]).name == "[&x 1, *x]"  # an override is text, never expanded


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    lines = RECIPE.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  lr: "))
    lines.insert(at + 2, "  lr: 0.1")  # the second would win silently
    (tmp_path / "twice.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(PotstillError) as err:
        load_recipe(tmp_path / "twice.yaml")
    assert str(err.value) == f"{tmp_path / 'twice.yaml'} line {at + 3}: key lr given twice (first on line {at + 1}): keep one"
    (tmp_path / "top.yaml").write_text(RECIPE.read_text() + "name: again\n")
    with pytest.raises(PotstillError, match=r"top.yaml line \d+: key name given twice \(first on line 4\)"):
        load_recipe(tmp_path / "top.yaml")


# a legitimate student.config of each architecture: fields, attribute_map aliases (GPT-2's
# hidden_size, Mixtral's num_experts), keys every config takes (torch_dtype, dtype, architectures,
# attn_implementation, token ids, tie_word_embeddings) and the RoPE keys of configs written before
# rope_parameters
ARCHITECTURES = {
    "gpt2": ("{model_type: gpt2, hidden_size: 32, n_layer: 2, n_head: 2, n_positions: 64, bos_token_id: 0, "
             "tie_word_embeddings: true, torch_dtype: float32, architectures: [GPT2LMHeadModel], "
             "attn_implementation: eager, use_cache: true}", {"n_embd": 32, "n_layer": 2}),
    "llama": ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
              "num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 64, rope_theta: 500000.0, "
              "rope_scaling: null, dtype: float32, attention_bias: false, tie_word_embeddings: true}",
              {"num_key_value_heads": 1, "head_dim": 16,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "qwen2": ("{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
              "num_key_value_heads: 2, max_position_embeddings: 64, use_sliding_window: false, sliding_window: 16, "
              "max_window_layers: 2, rope_parameters: {rope_type: default, rope_theta: 1000000.0}}",
              {"max_window_layers": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "gemma2": ("{model_type: gemma2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
               "num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 64, sliding_window: 16, "
               "query_pre_attn_scalar: 16, final_logit_softcapping: 30.0, hidden_activation: gelu_pytorch_tanh}",
               {"final_logit_softcapping": 30.0}),
    "mixtral": ("{model_type: mixtral, hidden_size: 32, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
                "num_key_value_heads: 2, num_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 64, "
                "output_router_logits: true, router_aux_loss_coef: 0.05}", {"num_local_experts": 4}),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_legitimate_student_config_of_each_architecture_loads_and_builds_what_it_says(tmp_path, arch):
    from potstill.train.loop import load_student, load_student_tokenizer

    config, expected = ARCHITECTURES[arch]
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", f"student.config={config}"])
    model = load_student(recipe, load_student_tokenizer(recipe))
    assert model.config.model_type == arch
    for key, value in expected.items():
        assert getattr(model.config, key) == value, key
    assert sum(p.numel() for p in model.parameters()) < 200_000  # none of the sizes fell back to a default


@pytest.mark.parametrize("config, expected", [
    ("{model_type: gpt2, n_embed: 32, n_layer: 2, n_head: 2}",
     "student.config.n_embed: not a setting of GPT2Config (gpt2), which would keep it unread; did you mean n_embd?"),
    ("{model_type: llama, hidden_size: 32, num_hidden_layer: 2}", "student.config.num_hidden_layer: not a setting of "
     "LlamaConfig (llama), which would keep it unread; did you mean num_hidden_layers?"),
    ("{model_type: llama, max_length: 128}", "student.config.max_length: not a setting of LlamaConfig (llama), which "
     "would keep it unread; remove it"),
    ("{model_type: lama, hidden_size: 32}", "student.config.model_type: 'lama' is not a model type transformers"),
])
def test_a_student_config_key_its_class_does_not_read_is_refused_at_load(tmp_path, config, expected):
    with pytest.raises(PotstillError) as err:
        load_recipe(RECIPE, [f"output_dir={tmp_path}", f"student.config={config}"])
    assert str(err.value).startswith(f"{RECIPE}: {expected}")
    assert str(err.value).endswith("did you mean llama?") or str(err.value) == f"{RECIPE}: {expected}"
    assert "\n" not in str(err.value)


HTTP_TEACHER = ["teacher.backend=openai", "teacher.model=m", "teacher.endpoints=[http://127.0.0.1:9]", "teacher.path=null",
                "teacher.terms_family=unknown"]


@pytest.mark.parametrize("override, expected", [
    (["train.objective=sft", "train.teacher_signal=on_policy"], "train: train.teacher_signal on_policy needs "
     "train.objective kd: objective sft trains on the teacher's text alone, and would run plain SFT"),
    (["train.objective=sft", "train.teacher_signal=online"], "train: train.teacher_signal online needs train.objective kd"),
    (["baseline.kd_ratio=0.3"], "baseline: baseline.kd_ratio is read by a KD baseline only, and baseline.objective is sft"),
    (["baseline.temperature=2.0"], "baseline: baseline.temperature is read by a KD baseline only"),
    ([*HTTP_TEACHER, "train.teacher_signal=online"], "recipe: train.teacher_signal online runs the teacher locally at "
     "every step, and teacher.path is not set"),
])
def test_contradictions_are_refused_at_load_naming_both_fields(tmp_path, override, expected):
    """What training would silently not do (plain SFT for an on-policy or online signal, a KD field
    of an SFT baseline), or refuse only after generating (an online teacher without weights)."""
    with pytest.raises(PotstillError) as err:
        load_recipe(RECIPE, [f"output_dir={tmp_path}", *override])
    assert str(err.value).startswith(f"{RECIPE}: {expected}") and "\n" not in str(err.value)


@pytest.mark.parametrize("override", [
    ["train.objective=sft"],  # the quickstart's kd_ratio and temperature stay: fields SFT does not read
    ["train.teacher_signal=on_policy", "train.lmbda=0.5"], ["train.teacher_signal=online"],
    ["baseline.objective=kd", "baseline.kd_ratio=0.3", "baseline.temperature=2.0"],
    [*HTTP_TEACHER, "train.objective=sft", "baseline=null"],
])
def test_what_is_no_contradiction_loads(tmp_path, override):
    load_recipe(RECIPE, [f"output_dir={tmp_path}", *override])
