"""Config parsing: file + overrides, unknown keys, validation naming the keys, redaction."""

from __future__ import annotations

import pytest

from ddptrain.config import (Config, ConfigError, build_parser, config_to_dict,
                             parse_config, validate_for_world)


def test_defaults_and_dotted_overrides():
    cfg = parse_config(["--data.root", "/x", "--model.name", "resnet18",
                        "--ckpt.every_steps", "7", "--ckpt.keep_last", "2",
                        "--ckpt.dir", "s3://bucket/run"])
    assert isinstance(cfg, Config)
    assert (cfg.data.root, cfg.model.name) == ("/x", "resnet18")
    assert (cfg.ckpt.every_steps, cfg.ckpt.keep_last, cfg.ckpt_dir) == (7, 2, "s3://bucket/run")
    assert parse_config([]).ckpt_dir == "runs/digits/checkpoints"


def test_yaml_file_then_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: adamw\n  lr: 0.003\ntrain:\n  epochs: 4\n")
    cfg = parse_config(["--config", str(path), "--train.epochs", "9"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("adamw", 0.003, 9)


def test_unknown_key_on_command_line_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data.rot", "/x"])
    assert exit_info.value.code == 2
    assert "--data.rot" in capsys.readouterr().err


def test_mistyped_key_in_config_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("ckpt:\n  keep_lats: 2\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "keep_lats" in capsys.readouterr().err


def test_bad_choice_lists_the_allowed_values(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--optim.name", "adam"])
    err = capsys.readouterr().err
    assert "optim.name" in err and "adamw" in err


def test_validation_reports_every_problem_with_its_key():
    with pytest.raises(ConfigError) as error:
        parse_config(["--ckpt.keep_last", "0", "--train.epochs", "0",
                      "--data.val_fraction", "1.5", "--optim.momentum", "5",
                      "--optim.betas", "[0.9, 1.5]"])
    message = str(error.value)
    for key in ("ckpt.keep_last=0", "train.epochs=0", "data.val_fraction=1.5",
                "optim.momentum=5.0: must be >= 0 and < 1",
                "optim.betas=(0.9, 1.5): each must be >= 0 and < 1"):
        assert key in message


def test_global_batch_must_divide_by_world_size_times_accumulation():
    cfg = parse_config(["--train.global_batch_size", "60", "--train.grad_accum_steps", "4"])
    validate_for_world(cfg, 3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=60 .* 8"):
        validate_for_world(cfg, 2)


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for option in ("--data.root", "--model.name", "--ckpt.dir", "--ckpt.every_steps",
                   "--ckpt.keep_last", "--train.global_batch_size", "--optim.name"):
        assert option in text
    assert "default: 3" in text  # ckpt.keep_last


def test_resolved_config_never_contains_secrets():
    cfg = parse_config(["--ckpt.storage_options",
                        '{"key": "AKIA1", "secret": "s3cr3t", "client_kwargs": '
                        '{"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "t"}}'])
    written = str(config_to_dict(cfg))
    assert "s3cr3t" not in written and "AKIA1" not in written and "'t'" not in written
    assert "http://127.0.0.1:9000" in written


def test_abbreviated_option_is_an_error_not_a_prefix_match(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--train.epoch", "2"])
    assert "--train.epoch" in capsys.readouterr().err


@pytest.mark.parametrize("text, problem", [
    ("train:\n  epochs: [1\n", "not a readable YAML config file"),
    ("- a\n- b\n", "must map sections to options"),
    ("a: &a [*a]\n", "not a readable YAML config file"),
])
def test_config_file_problems_name_the_file(tmp_path, capsys, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert f"--config {path}: {problem}" in capsys.readouterr().err


def test_empty_config_file_sets_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert parse_config(["--config", str(path)]) == parse_config([])
