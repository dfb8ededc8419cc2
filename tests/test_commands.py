"""One config per command: what each command reads, what it refuses, and run files it is lent."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lawtune.cli import main
from lawtune.commands import COMMANDS
from lawtune.config import ConfigError, load_config, sections_of
from lawtune.demo import demo_data_path

ROOT = Path(__file__).resolve().parents[1]
OLD_ADAPTER = Path(__file__).resolve().parent / "fixtures" / "adapter_before_issue14"


def test_eval_refuses_a_flag_it_does_not_have_and_creates_nothing(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "X"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--output-dir" in err and "valid flags:" in err and "--output," in err
    assert not out.exists()


@pytest.mark.parametrize("override", ["data.prompt_format=plain", "train.max_steps=7", "lora.r=3", "eval.nope=1"])
def test_eval_refuses_keys_it_does_not_read(override, tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--output", str(report),
                 override])
    err = capsys.readouterr().err.strip()
    key = override.split("=")[0]
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{key}: not a key of `lawtune eval`" in err and "valid keys: model.path" in err and "eval.output" in err
    assert not report.exists()


def test_overrides_may_follow_flags_and_print_config_shows_what_would_run(capsys):
    config = ROOT / "configs" / "demo.yaml"
    assert main(["train", str(config), "--output-dir", "X", "train.max_steps=2", "--print-config", "lora.r=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == ["model", "lora", "data", "train", "eval", "generation"]
    assert (printed["train"]["max_steps"], printed["train"]["output_dir"], printed["lora"]["r"]) == (2, "X", 4)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_exactly_its_sections(command, capsys):
    argv = command.split() + ([str(ROOT / "configs" / "demo.yaml")] if command == "train" else [])
    argv += ["a", "b"] if command in ("compare", "data overlap") else ["f.json"] if command in ("data check", "card") else []
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == list(sections_of(COMMANDS[command].config))


@pytest.mark.parametrize("command", ["eval", "predict", "ask", "serve"])
def test_max_new_tokens_means_the_same_in_every_command(command, capsys):
    assert main([command, "--max-new-tokens", "77", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["generation"]["max_new_tokens"] == 77


def test_every_flag_maps_onto_a_key_of_its_command():
    for command in COMMANDS.values():
        sections = sections_of(command.config)
        for flag, key in command.flags().items():
            section, name = key.split(".")
            assert name in sections[section].model_fields, (command, flag)


def test_a_run_file_lends_only_the_sections_the_command_reads(tmp_path, capsys):
    run_file = tmp_path / "lawtune_config.yaml"
    shutil.copy(OLD_ADAPTER / "lawtune_config.yaml", run_file)
    assert main(["eval", "--config", str(run_file), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) == {"model", "adapter", "eval", "generation"}  # lora, data and train stay behind
    # the old file's reasoning budget (300) is not direct mode's: direct keeps its own (8), now the mode default
    assert printed["generation"]["max_new_tokens"] == 8 and printed["eval"]["mode"] == "direct"
    assert printed["model"]["dtype"] == "float32"
    reasoning = run_file.read_text(encoding="utf-8").replace("  mode: direct", "  mode: reasoning")
    cfg = load_config(_yaml(tmp_path, yaml.safe_load(reasoning)), run_cls=COMMANDS["eval"].config, lend=True)
    assert cfg.generation.max_new_tokens == 300 and cfg.eval.mode == "reasoning"
    # a section no command reads is a mistake, not something to lend
    run_file.write_text(run_file.read_text(encoding="utf-8") + "trainer:\n  x: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="trainer: not a section of `lawtune eval`"):
        load_config(run_file, run_cls=COMMANDS["eval"].config, lend=True)
    # the train command's own YAML is not lent: a section train does not read is an error there
    with pytest.raises(ConfigError, match="adapter: not a section of `lawtune train`"):
        load_config(_yaml(tmp_path, {"adapter": {}}), run_cls=COMMANDS["train"].config)


def _yaml(tmp_path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_an_adapter_written_before_issue_14_still_loads_and_keeps_its_prompt_format(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from conftest import make_adapter

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    for name in ("lawtune_config.yaml", "data_manifest.json"):
        shutil.copy(OLD_ADAPTER / name, adapter / name)
    report = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(demo_data_path()),
                 "--max-samples", "4", "--output", str(report), "model.dtype=float32"]) == 0
    summary = json.loads(report.read_text(encoding="utf-8"))["summary"]
    assert summary["prompt_format"] == "plain" and summary["n"] == 4 and summary["adapter"] == str(adapter)


def test_eval_output_that_is_a_directory_is_refused_before_loading(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "none"), "--data", str(demo_data_path()), "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a directory" in err and len(err.splitlines()) == 1


def test_eval_without_a_model_or_data_says_which_flag_is_missing(tmp_path, capsys):
    assert main(["eval", "--data", str(demo_data_path()), "--output", str(tmp_path / "r.json")]) == 2
    assert "model.path: no base model given (pass --model" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--output", str(tmp_path / "r.json")]) == 2
    assert "eval.data: no file to score (pass --data" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--data", "d.json", "--max-samples", "0"]) == 2
    assert "eval.max_samples: input should be greater than 0, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_commands_help_shows_an_override_it_accepts(command, capsys):
    example = COMMANDS[command].example
    argv = command.split()
    assert main([*argv, "--help"]) == 0
    assert example in capsys.readouterr().out.replace("\n", " ").replace("  ", "")
    positional = {"train": [str(ROOT / "configs" / "demo.yaml")], "compare": ["a.json", "b.json"],
                  "data check": ["file.json"], "data overlap": ["a.json", "b.json"]}.get(command, [])
    assert main([*argv, *positional, example, "--print-config"]) == 0


@pytest.mark.parametrize("argv", [["grpo", str(ROOT / "configs" / "deepseek-r1-distill-qwen-1.5b_lora_grpo.yaml")],
                                  ["grpo", "--config", str(ROOT / "configs" / "deepseek-r1-distill-qwen-1.5b_lora_grpo.yaml")],
                                  ["train", "--config", str(ROOT / "configs" / "demo.yaml")],
                                  ["train", str(ROOT / "configs" / "demo.yaml")]])
def test_a_training_command_takes_its_yaml_positionally_or_with_config(argv, capsys):
    assert main([*argv, "--max-steps", "3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed[argv[0]]["max_steps"] == 3 and printed["lora"]["r"] in (8, 16)


def test_the_yaml_given_twice_or_to_a_command_without_one_is_refused(capsys):
    demo = str(ROOT / "configs" / "demo.yaml")
    assert main(["train", demo, "--config", demo]) == 2
    assert "give the run's YAML once" in capsys.readouterr().err
    assert main(["eval", demo]) == 2
    assert f"override '{demo}': expected key=value" in capsys.readouterr().err


def test_distill_shows_the_generation_settings_it_runs_with(capsys):
    assert main(["distill", "--print-config"]) == 0
    generation = yaml.safe_load(capsys.readouterr().out)["generation"]
    assert generation["max_new_tokens"] == 4096 and generation["do_sample"] is True
    assert main(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "reasoning completion" in text and "default 4096" in text
    assert main(["eval", "--help"]) == 0  # eval keeps the generic budget and greedy decoding
    text = " ".join(capsys.readouterr().out.split())
    assert "8 in direct mode, 2048 in reasoning mode" in text and "(generation.do_sample; default False)" in text
    assert main(["distill", "--data", "d.json", "--output", "o.json", "generation.do_sample=false"]) == 2
    assert "generation.do_sample: distill always samples" in capsys.readouterr().err


def test_every_field_of_a_commands_own_section_is_a_flag(capsys):
    assert main(["serve", "--slots", "4", "--max-len", "1024", "--print-config"]) == 0
    serve = yaml.safe_load(capsys.readouterr().out)["serve"]
    assert (serve["slots"], serve["max_len"]) == (4, 1024)
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), "--learning-rate", "3e-4", "--packing",
                 "--print-config"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert train["learning_rate"] == pytest.approx(3e-4) and train["packing"] is True
    assert main(["serve", "--slots", "many"]) == 2
    assert "serve.slots: input should be a valid integer" in capsys.readouterr().err


def test_demo_refuses_to_replace_a_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "final_model").mkdir(parents=True)
    (out / "final_model" / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert main(["demo", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run already" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["final_model"]  # nothing written, nothing removed


@pytest.mark.slow  # builds the demo model and tokenizer and trains two steps (~11 s on 2 cores)
def test_demo_with_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "final_model").mkdir(parents=True)
    stale = out / "final_model" / "stale.txt"
    stale.write_text("from the run before", encoding="utf-8")
    assert main(["demo", "--output-dir", str(out), "--overwrite", "train.max_steps=2", "train.eval_steps=0",
                 "train.optim=adamw_torch", "train.report_to=[none]"]) == 0
    assert not stale.exists() and (out / "final_model" / "adapter_config.json").is_file()
    assert "[demo] done" in capsys.readouterr().out
