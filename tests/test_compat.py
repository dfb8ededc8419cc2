"""lawtune/compat.py: every private (single-underscore) internal of transformers, peft, trl, liger_kernel and torch
that lawtune uses lives there, each still present in the installed release; no other module of src/lawtune uses one."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import transformers

from lawtune import compat

LIBRARIES = ("torch", "transformers", "peft", "trl", "liger_kernel")
SRC = Path(__file__).resolve().parents[1] / "src" / "lawtune"

# Private names that lawtune's own classes define and use on ``self`` (or, for ``def _x``, in a class derived from a
# library class: callbacks, tqdm). None of them is a name of the library class it derives from. A
# new one is added here by hand, after checking that; anything else private on a library object belongs in compat.py.
LAWTUNE_OWNED = frozenset({
    # generation/engine/: GenerationEngine
    "_loop", "_prefill", "_preempt", "_step_once",
    # serve/runtime.py: Job (a thread of lawtune's own)
    "_on_request", "_put", "_wake",
    # train/callbacks.py: HeldOutEvalCallback, GcPauses (transformers' TrainerCallback has no private names)
    "_run", "_on_gc", "_freeze",
    # train/trainer.py: LawtuneTrainer
    "_n_params", "_trainable",
    # progress.py: LogLines (tqdm)
    "_actions", "_next_percent", "_written",
})


def _fail(library: str, what: str) -> None:
    module = __import__(library)
    pytest.fail(f"{library} {module.__version__}: {what}; update lawtune/compat.py")


# ----------------------------------------------------------------------------- no private name outside compat.py


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _library_module(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES


class _Imports(ast.NodeVisitor):
    """Names a file binds to library modules (``import torch``) and to things imported from them."""

    def __init__(self):
        self.modules: set[str] = set()
        self.objects: set[str] = set()

    def visit_Import(self, node):
        for alias in node.names:
            if _library_module(alias.name):
                self.modules.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node):
        if node.level == 0 and _library_module(node.module):
            for alias in node.names:
                self.objects.add(alias.asname or alias.name)


def _root(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _library_derived(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of lawtune classes that derive (directly or through another lawtune class) from a library class, or
    from a base that compat.py builds."""
    bases: dict[str, list] = {}
    imports: dict[str, _Imports] = {}
    for path, tree in trees.items():
        imports[path] = found = _Imports()
        found.visit(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, []).extend((found, b) for b in node.bases)
    derived: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, pairs in bases.items():
            if name in derived:
                continue
            for found, base in pairs:
                root = _root(base)
                if (root in found.modules or root in found.objects or root == "compat" or root in derived
                        or (isinstance(base, ast.Name) and base.id in derived)):
                    derived.add(name)
                    changed = True
                    break
    return derived


def private_uses(trees: dict[Path, ast.Module]) -> list[str]:
    derived = _library_derived(trees)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(SRC.parent)

        def flag(node, what, where=where):
            found.append(f"{where}:{node.lineno}: {what}")

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not (own and node.attr in LAWTUNE_OWNED):
                    flag(node, ast.unparse(node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _library_module(alias.name) and any(_private(p) for p in alias.name.split(".")):
                        flag(node, f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and _library_module(node.module):
                parts = node.module.split(".") + [a.name for a in node.names]
                if any(_private(p) for p in parts):
                    flag(node, f"from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg and _private(keyword.arg):
                        flag(node, f"keyword {keyword.arg}= in {ast.unparse(node.func)}(...)")
                if (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                        and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
                    own = isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")
                    if not (own and node.args[1].value in LAWTUNE_OWNED):
                        flag(node, ast.unparse(node))
            elif isinstance(node, ast.ClassDef) and node.name in derived:
                for item in node.body:
                    if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name)
                            and item.name not in LAWTUNE_OWNED):
                        flag(item, f"def {item.name} in {node.name}, a subclass of a library class")
    return found


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(SRC.rglob("*.py"))
            if p.name != "compat.py" or p.parent != SRC}


def test_no_private_library_name_outside_compat():
    found = private_uses(_trees())
    assert not found, ("private library internals used outside lawtune/compat.py (move them there, or add a name "
                       "lawtune's own class defines to LAWTUNE_OWNED):\n" + "\n".join(found))


def test_the_checker_sees_every_kind_of_private_use():
    source = '''
import torch._dynamo
from torch._inductor import config
from liger_kernel.transformers import _apply
from transformers import Trainer
from trl import GRPOTrainer

class T(Trainer):
    def _clip_grad_norm(self, model):
        return super()._clip_grad_norm(model)

class G(GRPOTrainer):
    def _run(self):  # a lawtune-owned name: allowed
        return self._metrics, self._trainable

class H(T):
    def _save(self):
        pass

def f(c, mask):
    c._attn_implementation = "sdpa"
    torch._dynamo.config.recompile_limit = 8
    getattr(c, "_compiled_call_impl", None)
    return mask(_compile=True)
'''
    found = private_uses({SRC / "example.py": ast.parse(source)})
    text = "\n".join(found)
    for expected in ("import torch._dynamo", "from torch._inductor", "import _apply", "def _clip_grad_norm",
                     "super()._clip_grad_norm", "self._metrics", "def _save in H", "c._attn_implementation",
                     "torch._dynamo", "'_compiled_call_impl'", "keyword _compile="):
        assert expected in text, expected
    assert "self._trainable" not in text and "def _run" not in text


# ----------------------------------------------------------------------------- each entry's internal, still there


def _check_private_method(library: str, cls, name: str, params: list[str]) -> None:
    """``cls.name`` exists with these leading parameters, and its own module still calls it (``self.name(``)."""
    method = getattr(cls, name, None)
    if method is None:
        _fail(library, f"{cls.__name__}.{name} is gone")
    got = list(inspect.signature(method).parameters)
    if got[: len(params)] != params:
        _fail(library, f"{cls.__name__}.{name}({', '.join(got)}) changed; lawtune overrides it as "
                       f"{name}({', '.join(params)})")
    if f"self.{name}(" not in inspect.getsource(inspect.getmodule(method)):
        _fail(library, f"{cls.__name__} no longer calls {name}")


def test_attn_implementation():
    config = transformers.Qwen2Config(attn_implementation="eager")
    if not hasattr(config, "_attn_implementation") or compat.attn_implementation(config) != "eager":
        _fail("transformers", "PreTrainedConfig._attn_implementation no longer holds the config's attention")
    compat.set_attn_implementation(config, "sdpa")
    assert compat.attn_implementation(config) == "sdpa"


def test_is_module_compiled():
    if not hasattr(torch.nn.Module, "_compiled_call_impl"):
        _fail("torch", "nn.Module._compiled_call_impl is gone")
    layer = torch.nn.Linear(2, 2)
    assert not compat.is_module_compiled(layer)
    layer.compile()  # compiles lazily, at the first call
    if not compat.is_module_compiled(layer):
        _fail("torch", "nn.Module.compile() no longer sets _compiled_call_impl")


def test_raise_recompile_limits():
    import torch._dynamo

    config = torch._dynamo.config
    if not hasattr(config, "recompile_limit") and not hasattr(config, "cache_size_limit"):
        _fail("torch", "torch._dynamo.config.recompile_limit (and cache_size_limit) are gone")
    if not hasattr(config, "accumulated_recompile_limit"):
        _fail("torch", "torch._dynamo.config.accumulated_recompile_limit is gone")
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch({name: 3, "accumulated_recompile_limit": 5}):  # put back afterwards
        compat.raise_recompile_limits(per_code=40, accumulated=512)
        assert getattr(config, name) == 40 and config.accumulated_recompile_limit == 512
        compat.raise_recompile_limits(per_code=8, accumulated=6)  # never lowers them
        assert getattr(config, name) == 40 and config.accumulated_recompile_limit == 512


def test_enable_inductor_cpp_wrapper():
    import torch._inductor.config

    if not hasattr(torch._inductor.config, "cpp_wrapper"):
        _fail("torch", "torch._inductor.config.cpp_wrapper is gone")
    with torch._inductor.config.patch(cpp_wrapper=False):  # put back afterwards
        compat.enable_inductor_cpp_wrapper()
        assert torch._inductor.config.cpp_wrapper


def test_create_block_mask():
    from torch.nn.attention import flex_attention

    if "_compile" not in inspect.signature(flex_attention.create_block_mask).parameters:
        _fail("torch", "flex_attention.create_block_mask lost its _compile parameter")
    mask = compat.create_block_mask(lambda b, h, q, kv: q >= kv, 1, None, 256, 256, device="cpu", compile=False)
    assert isinstance(mask, flex_attention.BlockMask)


def test_liger_apply_to_instance():
    from importlib.metadata import version

    liger = pytest.importorskip("liger_kernel.transformers")  # not installed without a CUDA GPU (lawtune[gpu])
    if not callable(getattr(liger, "_apply_liger_kernel_to_instance", None)):
        pytest.fail(f"liger_kernel {version('liger-kernel')}: liger_kernel.transformers."
                    "_apply_liger_kernel_to_instance is gone; update lawtune/compat.py")
    assert "model" in inspect.signature(compat.liger_apply_to_instance()).parameters


def test_trainer_with_hooks():
    from transformers import Trainer

    _check_private_method("transformers", Trainer, "_clip_grad_norm", ["self", "model"])
    hooked = compat.trainer_with_hooks()
    assert issubclass(hooked, Trainer) and not hasattr(Trainer, "clip_grad_norm_hook")
    assert hooked._clip_grad_norm is not Trainer._clip_grad_norm


def test_grpo_trainer_with_hooks():
    import trl
    from trl import GRPOTrainer

    _check_private_method("trl", GRPOTrainer, "_tokenize_prompts", ["self", "prompts"])
    _check_private_method("trl", GRPOTrainer, "_calculate_rewards",
                          ["self", "inputs", "prompts", "completions", "completion_ids_list"])
    _check_private_method("trl", GRPOTrainer, "_generate_and_score_completions", ["self", "inputs"])
    _check_private_method("trl", GRPOTrainer, "_get_per_token_logps_and_entropies",
                          ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                           "compute_entropy", "compute_aux_loss"])
    _check_private_method("transformers", GRPOTrainer, "_save", ["self", "output_dir", "state_dict"])
    hooked = compat.grpo_trainer_with_hooks()
    assert issubclass(hooked, GRPOTrainer)
    for name in ("tokenize_prompts_hook", "calculate_rewards_hook", "generate_and_score_hook", "per_token_logps_hook",
                 "save_hook"):
        assert not hasattr(GRPOTrainer, name), f"trl {trl.__version__}: GRPOTrainer.{name} exists; rename the hook"


def test_grpo_tokenizer_and_metrics():
    import trl
    from trl import GRPOTrainer

    init, log = inspect.getsource(GRPOTrainer.__init__), inspect.getsource(GRPOTrainer.log)
    if "self._tokenizer =" not in init:
        pytest.fail(f"trl {trl.__version__}: GRPOTrainer no longer sets _tokenizer; update lawtune/compat.py")
    if "self._metrics =" not in init or "self._metrics[mode]" not in log:
        pytest.fail(f"trl {trl.__version__}: GRPOTrainer no longer logs its _metrics[mode] lists; update "
                    "lawtune/compat.py")
    fake = type("Fake", (), {})()
    fake._tokenizer, fake._metrics = "tokenizer", {"train": {"x": []}}
    compat.grpo_log_metric(fake, "train", "x", 1.0)
    assert compat.grpo_tokenizer(fake) == "tokenizer" and fake._metrics["train"]["x"] == [1.0]
