from pathlib import Path

import pytest

from capdpo.errors import ConfigError
from capdpo.sections import SECTIONS, load_config, validate_config_file

ROOT = Path(__file__).resolve().parent.parent


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_config_in_configs_loads_and_validates():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    run_configs = [f for f in files if "accelerate" not in f.parts]
    assert run_configs, "configs/ holds no run YAML"
    for path in run_configs:
        built = validate_config_file(path)
        assert built["common"].run_dir, path
        for section in built:
            if section != "common":
                assert section in SECTIONS


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = _yaml(tmp_path, "run_dir: r\nseed: 3\ndescribe:\n  max_new_tokens: 50\n  prompts: [Say hi.]\n")
    cfg = load_config("describe", ["--config", str(path), "--max_new_tokens", "7", "--seed", "9"])
    assert cfg.section.max_new_tokens == 7 and cfg.common.seed == 9
    assert cfg.section.prompts == ["Say hi."] and cfg.common.run_dir == "r"
    assert cfg.section.temperature == 0.7  # default kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "run_dir: r\ndescribe:\n  max_new_token: 5\n",
            r"describe: unknown key 'max_new_token' — did you mean 'max_new_tokens'",
        ),
        ("run_dir: r\ndescirbe:\n  k: 1\n", r"unknown key 'descirbe' — did you mean 'describe'"),
        ("run_dir: r\nvariants:\n  k: many\n", r"variants: 'k' should be int, got 'many'"),
        ("run_dir: r\nvalidate:\n  methods: [yesno, vibes]\n", r"validate.methods: \['vibes'\]"),
        ("run_dir: r\nvalidate:\n  methods: [yesno]\n  weights: [1, 2]\n", r"1 methods"),
        ("run_dir: r\ndtype: float16\n", r"dtype: 'float16'"),
        ("run_dir: r\nvariants:\n  k: 3\n  temperature: 0\n", r"variants.k: greedy decoding"),
        ("run_dir: r\npairs: 3\n", r"section 'pairs' must be a mapping"),
        ("run_dir: r\ndescribe:\n  decode_window: -1\n", r"describe.decode_window: must be >= 0"),
        ("run_dir: [r\n", r"run.yaml:\d+: malformed YAML"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("run_dir: r\nseed: 1\nseed: 2\n", r"run.yaml:3: malformed YAML \(duplicate key 'seed' \(first on line 2\)\)"),
        ("run_dir: r\npairs:\n  min_gap: 0.1\n  min_gap: 0.3\n", r"run.yaml:4: .*duplicate key 'min_gap'"),
    ],
)
def test_bad_yaml_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config("describe", ["--config", str(path)])
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value) or "run.yaml" in str(err.value)


def test_unknown_flag_and_bad_flag_value(tmp_path):
    path = _yaml(tmp_path, "run_dir: r\n")
    with pytest.raises(ConfigError, match=r"unknown flag '--max_new_token' .* did you mean '--max_new_tokens'"):
        load_config("describe", ["--config", str(path), "--max_new_token", "3"])
    with pytest.raises(ConfigError, match=r"command line: .*max_new_tokens"):
        load_config("describe", ["--config", str(path), "--max_new_tokens", "lots"])
    with pytest.raises(ConfigError, match=r"not found"):
        load_config("describe", ["--config", str(tmp_path / "missing.yaml")])


def test_a_yaml_with_other_tools_sections_validates_for_every_stage(tmp_path):
    from capdpo.pipeline import STAGES

    text = (
        "run_dir: r\n"
        "interop:\n  format: trl\n  input: x.jsonl\n"
        "sft:\n  max_steps: 2\n"
        "answers:\n  benchmark: amber\n"
        "mmhal:\n  unparseable: zero\n"
        "llava_bench:\n  out: m.json\n"
        "report:\n  title: t\n"
    )
    path = _yaml(tmp_path, text)
    for info in STAGES:
        assert load_config(info.section, ["--config", str(path)]).name == info.section
    assert load_config("interop", ["--config", str(path)]).section.format == "trl"


def test_a_byte_order_mark_does_not_hide_the_first_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("\ufeffrun_dir: bom\n".encode())
    assert load_config("describe", ["--config", str(path)]).common.run_dir == "bom"


def test_command_lines_hide_only_the_dependencies_gradient_checkpointing_deprecations() -> None:
    """PEFT and TRL call transformers' old gradient-checkpointing names: a capdpo command hides those FutureWarnings
    and no other warning, and one-line errors still exit with code 2."""
    import warnings

    import pytest

    from capdpo.cli import run_cli
    from capdpo.errors import ConfigError

    def main(argv):  # noqa: ANN001, ANN202
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("`some_other_option` is deprecated", FutureWarning, stacklevel=1)
        raise ConfigError("stop here")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, [])
    assert exit_info.value.code == 2
    assert [str(w.message) for w in seen] == ["`some_other_option` is deprecated"]
