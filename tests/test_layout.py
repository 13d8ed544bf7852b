"""The source layout's rules (README, "Layout"), checked on the source itself:
every rule here failed on the tree before the architecture issue, and a
change that breaks one fails this test with the offending file and line.

- No two modules import each other, directly or through a loop (a module
  is a file; `pub use` re-exports count, `mod` declarations do not).
- `model`, `data`, `formats` and `optim` import nothing from `train`,
  `eval`, `export` or `cmd`; `data` imports neither the model nor the shim.
- No module of `cmd/` imports another subcommand's module.
- The library knows no clap and no terminal; `unsafe` only in the shim
  (`src/shim.rs` and `src/shim/`);
  one place sets the panic hook.
- No source file over 600 lines, no function over 80.
"""

import os
import re
from pathlib import Path

SRC = Path(os.environ.get("VGGCTL_LAYOUT_SRC", Path(__file__).resolve().parent.parent / "src"))
SUBCOMMANDS = {"info", "params", "train", "eval", "finetune", "export", "predict", "features", "prepare"}
MAX_FILE_LINES = 600
MAX_FN_LINES = 80


def module_of(path):
    """`src/a/b.rs` -> ('lib', 'a::b'); `src/a/mod.rs` -> 'a'; the binary's
    files (main.rs, cmd/) are the crate 'bin'."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    crate = "bin" if parts and parts[0] in ("main", "cmd") else "lib"
    if parts in (["lib"], ["main"]):
        parts = []
    return crate, "::".join(parts)


def sources():
    return sorted(p for p in SRC.rglob("*.rs"))


def code_lines(path):
    """Lines without comments and string contents (enough for these checks)."""
    out = []
    for line in path.read_text().split("\n"):
        line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
        out.append(line.split("//")[0])
    return out


def without_unit_tests(lines):
    """The lines before a file's `#[cfg(test)] mod tests` (at its end, as
    everywhere here): a unit test module's `use super::*` reaches into its
    own file's module, not the parent, and tests are not the layering."""
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and lines[i + 1].strip().startswith("mod tests"):
            return lines[:i]
    return lines


def use_paths(lines):
    """Every path a file names through `use` (braces expanded) or inline
    (`crate::a::b`, `super::x`), with its line number."""
    text = "\n".join(lines)
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        line = text[: m.start()].count("\n") + 1
        for p in expand(m.group(1)):
            paths.append((line, p))
    for m in re.finditer(r"(?<![\w:])((?:crate|super|vggctl)(?:::\w+)+)", text):
        paths.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return paths


def expand(tree):
    """`a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    tree = tree.strip()
    if "{" not in tree:
        return [re.sub(r"\s+", "", re.split(r"\s+as\s+", tree)[0])]
    head, rest = tree.split("{", 1)
    inner = rest[: rest.rfind("}")]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    out = []
    for item in filter(str.strip, items):
        out.extend(expand(head.strip() + item.strip()))
    return out


def resolve(crate, module, path, modules):
    """The module a path lands in (the longest existing module prefix)."""
    parts = path.split("::")
    if parts[0] == "vggctl":
        crate, base = "lib", []
        parts = parts[1:]
    elif parts[0] == "crate":
        base = []
        parts = parts[1:]
    elif parts[0] == "super":
        base = module.split("::") if module else []
        while parts and parts[0] == "super":
            base = base[:-1]
            parts = parts[1:]
    else:
        return None
    full = base + parts
    for n in range(len(full), -1, -1):
        cand = "::".join(full[:n])
        if (crate, cand) in modules:
            return (crate, cand)
    return None


def graph():
    modules = {module_of(p): p for p in sources()}
    edges = {}
    for key, path in modules.items():
        for line, p in use_paths(without_unit_tests(code_lines(path))):
            target = resolve(key[0], key[1], p, modules)
            if target is None or target == key:
                continue
            edges.setdefault(key, {}).setdefault(target, line)
    return modules, edges


def name(key):
    crate, module = key
    return f"{crate}:{module or '(root)'}"


def test_no_module_imports_itself_through_a_loop():
    modules, edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(modules):
        if node not in state:
            visit(node)
    assert not cycles, "import loops: " + "; ".join(
        " -> ".join(name(n) for n in c) for c in cycles
    )


def imports(crate, top):
    """(importer, target, line) for every edge out of `top` (and below)."""
    modules, edges = graph()
    for src, targets in edges.items():
        if src[0] == crate and src[1].split("::")[0] == top:
            for dst, line in targets.items():
                yield modules[src], dst, line


def test_lower_modules_never_import_upper_ones():
    bad = []
    for low in ["model", "data", "formats", "optim"]:
        for path, dst, line in imports("lib", low):
            if dst[0] == "bin" or dst[1].split("::")[0] in {"train", "eval", "export"}:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {name(dst)}")
    for path, dst, line in imports("lib", "data"):
        if dst[1].split("::")[0] in {"model", "shim", "numerics", "infer"}:
            bad.append(f"{path.relative_to(SRC)}:{line} imports {name(dst)}")
    assert not bad, "\n".join(bad)


def test_no_subcommand_imports_another():
    bad = []
    for path, dst, line in imports("bin", "cmd"):
        own = module_of(path)[1].split("::")
        target = dst[1].split("::")
        if (
            dst[0] == "bin"
            and len(target) == 2
            and target[1] in SUBCOMMANDS
            and target != own
        ):
            bad.append(f"{path.relative_to(SRC)}:{line} imports {name(dst)}")
        if dst == ("bin", "cmd") and own != ["cmd"]:
            bad.append(f"{path.relative_to(SRC)}:{line} imports the dispatch module")
    assert not bad, "\n".join(bad)


def test_the_library_knows_no_clap_terminal_or_unsafe():
    bad = []
    hooks = []
    for path in sources():
        crate, _ = module_of(path)
        text = "\n".join(code_lines(path))
        rel = path.relative_to(SRC)
        if crate == "lib":
            for pat in [r"\bclap::", r"\beprintln!", r"\bprintln!", r"\bprint!", r"\beprint!"]:
                if re.search(pat, text):
                    bad.append(f"{rel}: {pat}")
        if re.search(r"\bunsafe\b", text) and rel != Path("shim.rs") and rel.parts[0] != "shim":
            bad.append(f"{rel}: unsafe outside the shim")
        if "set_hook" in text:
            hooks.append(str(rel))
    assert not bad, "\n".join(bad)
    assert hooks == ["main.rs"], hooks


def functions(path):
    """(name, first line, length) of every fn with a body."""
    lines = code_lines(path)
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)", line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            s = re.sub(r"'(\\.|[^'\\])'", "''", lines[j])
            for ch in s:
                depth += ch == "{"
                depth -= ch == "}"
                started |= ch == "{"
            if started and depth == 0:
                out.append((m.group(5), i + 1, j - i + 1))
                break
            if not started and s.rstrip().endswith(";"):
                break
    return out


def test_files_and_functions_stay_small():
    bad = []
    for path in sources():
        rel = path.relative_to(SRC)
        n = len(path.read_text().split("\n"))
        if n > MAX_FILE_LINES:
            bad.append(f"{rel}: {n} lines")
        for fn, line, length in functions(path):
            if length > MAX_FN_LINES:
                bad.append(f"{rel}:{line} fn {fn}: {length} lines")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_loop_and_a_long_function(tmp_path):
    """The rules above can fail: a planted loop and a planted 81-line
    function are found by the same code."""
    a, b = tmp_path / "a.rs", tmp_path / "b.rs"
    a.write_text("use crate::b::X;\npub struct Y;\n")
    b.write_text("use crate::a::Y;\npub struct X;\n" + "fn f() {\n" + "    let _ = 1;\n" * 79 + "}\n")
    modules = {("lib", "a"): a, ("lib", "b"): b}
    found = {
        resolve("lib", m, p, modules)
        for key in modules
        for _, p in use_paths(code_lines(modules[key]))
        for m in [key[1]]
    }
    assert found == {("lib", "a"), ("lib", "b")}
    assert functions(b) == [("f", 3, 81)]
    assert expand("a::{b, c::{d, e as f}}") == ["a::b", "a::c::d", "a::c::e"]
