from pathlib import Path

import pytest

from lawtune.config import ConfigError, EvalRun, GrpoRun, ServeRun, TrainRun, load_config, validate
from lawtune.rundir import resolve_output_dir

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "deepseek-r1-distill-qwen-1.5b_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_and_says_how_to_run_it(path):
    # a *_grpo.yaml is a `lawtune grpo` run, every other one a `lawtune train` run
    cfg = load_config(path, run_cls=GrpoRun if path.stem.endswith("_grpo") else TrainRun)
    assert cfg.source == str(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#")
    assert "lawtune" in path.read_text(encoding="utf-8").split("\n\n")[0]


def test_original_recipe_config_keeps_the_original_values():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "original_recipe.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    assert len(cfg.lora.target_modules) == 7
    t = cfg.train
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (2, 4, 2e-4)
    assert (t.max_steps, t.warmup_steps, t.optim) == (5000, 100, "adamw_bnb_8bit")
    assert cfg.model.dtype == "float16" and not t.packing and t.batch_tokens is None and not t.sparse_logits


def test_default_config_is_the_fast_one_with_the_original_model_and_lora():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "deepseek-r1-distill-qwen-1.5b_lora.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, len(cfg.lora.target_modules)) == (16, 16, 0.0, 7)
    t = cfg.train
    assert t.learning_rate == 2e-4 and t.packing and t.batch_tokens >= cfg.data.max_length
    assert t.sparse_logits and t.compile and cfg.model.attn_implementation == "flex_attention"
    low = load_config(Path(__file__).resolve().parents[1] / "configs" / "low_memory.yaml")
    assert low.train.gradient_checkpointing and low.train.batch_tokens == low.data.max_length == 2048
    assert resolve_output_dir(cfg) == Path("outputs/deepseek-r1-distill-qwen-1.5b_lora")


def test_ddp_config_sees_as_many_tokens_as_the_default_on_two_gpus():
    root = Path(__file__).resolve().parents[1] / "configs"
    one = load_config(root / "deepseek-r1-distill-qwen-1.5b_lora.yaml")
    ddp = load_config(root / "deepseek-r1-distill-qwen-1.5b_lora_ddp.yaml")
    a, b = one.train, ddp.train
    scale = (b.batch_tokens * b.gradient_accumulation_steps * 2) / (a.batch_tokens * a.gradient_accumulation_steps)
    for key in ("max_steps", "warmup_steps", "eval_steps", "save_steps"):  # intervals shrink with the larger batch
        assert abs(getattr(b, key) * scale / getattr(a, key) - 1) < 0.1, key
    assert b.ddp_bucket_cap_mb == 80 and b.learning_rate == a.learning_rate
    assert (ddp.model, ddp.lora, ddp.data) == (one.model, one.lora, one.data)


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        validate(TrainRun, {"train": {"max_stpes": 3}})
    assert "train.max_stpes" in str(err.value) and "max_steps" in str(err.value)
    with pytest.raises(ConfigError, match="not a section of `lawtune train`"):
        validate(TrainRun, {"trainer": {}})


def test_overrides_dotted_shorthand_and_scientific_floats(tmp_path):
    cfg = load_config(None, ["model=./m", "data=1_train.json", "train.learning_rate=3e-4", "train.max_steps=7",
                             "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.path == "./m" and cfg.data.train == "1_train.json"
    assert cfg.train.learning_rate == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,key", [
    ("model.dtype=int8", "model.dtype"),
    ("data.prompt_format=xml", "data.prompt_format"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.ddp_bucket_cap_mb=2.5", "train.ddp_bucket_cap_mb"),
    ("train.batch_tokens=0", "train.batch_tokens"),
    ("train.learning_rate=fast", "train.learning_rate"),
    ("eval.mode=vote", "eval.mode"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("lora.init=loftq", "lora.init"),
    ("lora.use_dora=maybe", "lora.use_dora"),
    ("nosection=1", "nosection"),
])
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("value,ok", [("70%", True), ("40GiB", True), ("0.5GiB", True), ("70", False),
                                      ("0%", False), ("100%", False), ("40GB", False)])
def test_the_kv_budget_is_gib_or_a_share(value, ok):
    if ok:
        assert load_config(None, [f"generation.kv_cache={value}"], run_cls=EvalRun).generation.kv_cache == value
    else:
        with pytest.raises(ConfigError, match=r"generation\.kv_cache"):
            load_config(None, [f"generation.kv_cache={value}"], run_cls=EvalRun)


def test_serve_refuses_a_kv_budget_beside_given_rows():
    assert load_config(None, ["serve.slots=8"], run_cls=ServeRun).serve.slots == 8
    with pytest.raises(ConfigError, match=r"generation\.kv_cache: not read with serve\.slots"):
        load_config(None, ["serve.slots=8", "generation.kv_cache=4GiB"], run_cls=ServeRun)


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# x\ntrain:\n  max_steps: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(bad)


@pytest.mark.parametrize("overrides,message", [
    (["lora.init=pissa", "lora.use_dora=true"], "lora.init: pissa with lora.use_dora"),
    (["lora.init=olora", "lora.modules_to_save=[lm_head]"], "lora.init: olora with lora.modules_to_save"),
    (["lora.modules_to_save=[q_proj]"], "lora.modules_to_save: q_proj also in lora.target_modules"),
    (["lora.init=pissa", "model.quantization=4bit"], "lora.init: pissa rewrites the base weights"),
])
def test_lora_variants_that_cannot_be_saved_as_a_lora_of_the_original_base_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_grpo_refuses_pissa_where_its_kl_reference_is_the_base():
    with pytest.raises(ConfigError, match="grpo.beta > 0 uses the base"):
        load_config(None, ["lora.init=olora", "grpo.beta=0.04"], run_cls=GrpoRun)
    assert load_config(None, ["lora.init=olora"], run_cls=GrpoRun).lora.init == "olora"  # beta 0: no reference


def test_lora_variants_reach_peft(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lawtune.config import LoraSection
    from lawtune.model import ModelError, lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_config = lora_config(model, LoraSection(use_dora=True, use_rslora=True, init="gaussian",
                                                 modules_to_save=["lm_head"]))
    assert (peft_config.use_dora, peft_config.use_rslora, peft_config.init_lora_weights) == (True, True, "gaussian")
    assert peft_config.modules_to_save == ["lm_head"]
    assert lora_config(model, LoraSection()).init_lora_weights is True and not lora_config(model, LoraSection()).use_dora
    with pytest.raises(ModelError, match="lora.modules_to_save: score not found"):
        lora_config(model, LoraSection(modules_to_save=["score"]))
    model.config.tie_word_embeddings = True
    with pytest.raises(ModelError, match="lora.modules_to_save: lm_head: this model ties"):
        lora_config(model, LoraSection(modules_to_save=["lm_head"]))
