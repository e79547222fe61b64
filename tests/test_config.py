"""Config loading: overrides apply, defaults fill in, and a bad config fails at start naming the key."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from config import SCHEMA, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(str(path), [])
    assert set(cfg.generate) == set(SCHEMA["generate"])
    if "model" in cfg:
        assert set(cfg.model) == set(SCHEMA["model"])


def test_shipped_experiments_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "config.yaml", "finetune_humdial_7b.yaml", "decode_config.yaml"} <= names


def test_options_override_and_parse_types() -> None:
    cfg = load_config(str(ROOT / "configs/demo.yaml"),
                      ["run.optims.init_lr=1e-4", "run.batch_size_train=3", "model.lora_target_modules=[q_proj]"])
    assert cfg.run.optims.init_lr == pytest.approx(1e-4)
    assert cfg.run.batch_size_train == 3
    assert list(cfg.model.lora_target_modules) == ["q_proj"]


def test_defaults_fill_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  llama_path: a\n  whisper_path: b\nrun:\n  seed: 7\n")
    cfg = load_config(str(path), [])
    assert cfg.run.seed == 7
    assert cfg.run.optims.warmup_steps == SCHEMA["run"]["optims"]["warmup_steps"]
    assert cfg.model.lora_rank == SCHEMA["model"]["lora_rank"]
    assert cfg.generate.num_beams == SCHEMA["generate"]["num_beams"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["model.lora_rnak=4"], "did you mean `model.lora_rank`"),
        (["run.optims.int_lr=1e-4"], "did you mean `run.optims.init_lr`"),
        (["run.batch_size=2"], "unknown config key `run.batch_size`"),
        (["modle.lora=false"], "did you mean `model`"),
        (["run.batch_size_train=two"], "`run.batch_size_train` must be int"),
        (["run.epoch_based=1"], "`run.epoch_based` must be bool"),
        (["run.amp=fp16"], "`run.amp` must be bool"),
        (["run.amp=false", "run.precision=bf16"], "run.amp: false and run.precision: bf16 disagree"),
        (["run.world_size=0"], "`run.world_size` must be >= 1"),
        (["model.token=hf_x"], "local folders only"),
        (["run.precision=fp8"], "`run.precision` must be one of auto, bf16, fp16, fp32"),
        (["run.nonfinite_loss=ignore"], "`run.nonfinite_loss` must be one of stop, skip"),
        (["run.seed"], "key=value"),
    ],
)
def test_bad_key_fails_naming_it(options: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("`", "`")):
        load_config(str(ROOT / "configs/demo.yaml"), options)


def test_required_key_missing_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  llama_path: a\n")
    with pytest.raises(ConfigError, match="required config key `model.whisper_path` is missing"):
        load_config(str(path), [])


def test_required_section_missing_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="`model:` section is required"):
        load_config(str(path), [], required_sections=("model",))


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    beams = tmp_path / "beams.yaml"
    beams.write_text("generate:\n  num_beams: 4\n  max_new_tokens: 99\n")
    cfg = load_config([str(ROOT / "configs/demo.yaml"), str(beams)], ["generate.max_new_tokens=7"])
    assert cfg.model.llm_path == "assets/tiny/llama"  # from demo.yaml
    assert cfg.generate.num_beams == 4  # the later file wins over demo.yaml
    assert cfg.generate.max_new_tokens == 7  # the options win over both


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])


def test_train_rejects_bad_config_before_building_anything(tmp_path: Path) -> None:
    import train

    with pytest.raises(ConfigError, match="did you mean `run.optims.max_epoch`"):
        train.main(["--cfg-path", str(ROOT / "configs/demo.yaml"), "--options", "run.optims.max_epochs=1",
                    f"run.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def restated_defaults(given: dict, schema: dict, prefix: str = "") -> list[str]:
    """The keys of a config section whose values are the schema's defaults."""
    found = []
    for key, value in given.items():
        default = schema.get(key)
        if isinstance(default, dict):
            found += restated_defaults(value or {}, default, f"{prefix}{key}.")
        elif key in schema and default != "???" and type(value) is type(default) and value == default:
            found.append(f"{prefix}{key}")
        elif isinstance(value, list) and isinstance(default, list) and value == default:
            found.append(f"{prefix}{key}")
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_hold_only_what_differs_from_the_defaults(path: Path) -> None:
    """config.py is the one home of the defaults: a config that restates one would silently keep an old value
    when the default changes. Each config also says in its first line what it is for."""
    from models import MODEL_DEFAULTS

    given = OmegaConf.to_container(OmegaConf.load(path))
    assert restated_defaults(given, {**SCHEMA, "model": MODEL_DEFAULTS}) == []
    assert path.read_text().startswith("# ")
    load_config(str(path))  # and every key is known, every value of its type
