"""The help a new user reads, checked through the real binary: every
option of every subcommand has a description, training's options come in
named groups, every example a `--help` shows parses as written, the
environment and exit codes are on the top-level page; `completions`
produces scripts bash really completes with, and `man` pages groff renders
without a warning, one per subcommand."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
SUBCOMMANDS = ["info", "params", "train", "eval", "finetune", "export", "predict", "features", "prepare",
               "completions", "man"]


def vggctl(*args, check=True, cwd=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, check=check, timeout=60, cwd=cwd)


def test_top_level_help_names_the_environment_and_exit_codes():
    text = vggctl("--help").stdout
    # Every dataset vggctl downloads has its URL variable: the names come from
    # train --help's --dataset, less those read from local folders or built in.
    datasets = re.search(r"Dataset: (.*?) \[default", vggctl("train", "--help").stdout, re.S).group(1)
    # EMNIST's six splits share one zip, and so one variable; FGVC-Aircraft's
    # three annotation levels one archive.
    downloaded = {re.sub(r"^(emnist)-.*|^(fgvc-aircraft)-.*", r"\1\2", d)
                  for d in re.findall(r"(?:^|, | or )([a-z0-9-]+)(?= \(|,| or |$)", datasets)
                  if d not in ("digits", "folder", "imagenet", "stanford-cars", "fer2013")}
    assert len(downloaded) == 26 and {"oxford-pets", "flowers102", "food101", "dtd", "emnist"} < downloaded, downloaded
    urls = [f"VGGCTL_{d.upper().replace('-', '_')}_URL" for d in downloaded]
    for name in ["VGGCTL_WEIGHTS_DIR", "VGGCTL_WEIGHTS_URL", "TORCH_HOME", "VGGCTL_HTTP_TIMEOUT",
                 "VGGCTL_LOG_INTERVAL", "MASTER_ADDR", "VGGCTL_<DATASET>_MD5", *urls]:
        assert re.search(rf"^  (\S+, )*{re.escape(name)}(,|\s)", text, re.M), name
    assert "0 success, 1 a failure while running, 2 a command line that cannot work" in text
    for sub in SUBCOMMANDS:
        assert re.search(rf"^  {sub} +\S", text, re.M), sub


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_option_is_described_and_every_example_parses(sub, tmp_path):
    text = vggctl(sub, "--help").stdout
    lines = text.split("\n")
    options = [i for i, l in enumerate(lines) if re.match(r"^  (-\w, )?--[\w-]+|^  <\w+>", l)]
    assert options
    for i in options:
        inline = re.match(r"^  \S.*?\S {2,}\S", lines[i])  # a one-line help: "  -h, --help  Print help"
        # A description, not only clap's "[default: ...]" or value list.
        described = lines[i + 1].startswith(" " * 10) and lines[i + 1].strip()[:1] not in ("", "[")
        assert inline or described, lines[i]
    if sub == "info":
        return
    examples = text[text.index("\nExamples:\n"):].split("\n")[2:]
    commands = [l.strip() for l in examples if l.strip().startswith("vggctl ")]
    assert commands, text
    for c in commands:
        # Without the comment after two spaces, the redirection and the pipe;
        # --help after the arguments makes clap check them and stop.
        words = re.split(r"\s{2,}|\s[|>]\s", c)[0].split()[1:]
        r = vggctl(*words, "--help", check=False, cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "", (c, r.stderr)


def test_training_options_are_grouped():
    for sub in ["train", "finetune"]:
        text = vggctl(sub, "--help").stdout
        headings = re.findall(r"^([A-Z][\w-]*):$", text, re.M)
        assert headings == ["Options", "Model", "Data", "Schedule", "Optimizer", "Output", "Speed",
                            "Data-parallel", "Examples"], (sub, headings)
        group = lambda opt: [h for h in headings if re.search(
            rf"^{h}:\n(?:(?!^[A-Z][\w-]*:$).*\n)*?^\s+(-\w, )?{opt}(?![\w-])", text, re.M)]
        assert group("--lr") == ["Optimizer"] and group("--milestones") == ["Schedule"]
        assert group("--lr-min") == ["Schedule"]
        assert group("--data-dir") == ["Data"] and group("--arch") == ["Model"]
        assert group("--precision") == ["Speed"] and group("--out") == ["Output"]


def test_bash_completes_subcommands_and_options(tmp_path):
    script = tmp_path / "vggctl.bash"
    script.write_text(vggctl("completions", "bash").stdout)
    def complete(*words):
        line = " ".join(["vggctl", *words])
        r = subprocess.run(
            ["bash", "-c", f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; '
             f'_vggctl vggctl {words[-1]} {words[-2] if len(words) > 1 else "vggctl"}; echo "${{COMPREPLY[@]}}"'],
            capture_output=True, text=True, check=True, timeout=60)
        return r.stdout.split()
    assert complete("tr") == ["train"]
    assert complete("train", "--ar") == ["--arch"]
    assert set(complete("export", "--fo")) == {"--format", "--force", "--fold-bn"}
    for shell, marker in [("zsh", "#compdef vggctl"), ("fish", "complete -c vggctl"),
                          ("powershell", "Register-ArgumentCompleter"), ("elvish", "edit:completion")]:
        out = vggctl("completions", shell).stdout
        assert marker in out and "--arch" in out and "finetune" in out, shell
    r = vggctl("completions", "tcsh", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "possible values: bash" in r.stderr


def test_man_pages_render_cleanly(tmp_path):
    def render(roff):
        r = subprocess.run(["groff", "-man", "-Tascii", "-ww"], input=roff, capture_output=True,
                           text=True, check=True, timeout=60)
        assert r.stderr == ""
        return re.sub(r".\x08", "", r.stdout)
    top = render(vggctl("man").stdout)
    assert "vggctl-train(1)" in top and "VGGCTL_WEIGHTS_DIR" in top
    vggctl("man", "--dir", str(tmp_path / "man1"))
    pages = sorted(os.listdir(tmp_path / "man1"))
    assert pages == sorted(["vggctl.1"] + [f"vggctl-{s}.1" for s in SUBCOMMANDS])
    train = render((tmp_path / "man1" / "vggctl-train.1").read_text())
    assert "--arch" in train and "--milestones" in train and "vggctl train --resume" in train
