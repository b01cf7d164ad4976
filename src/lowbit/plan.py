"""Plans: which layer gets which number format, as data with a JSON round trip.

A :class:`LayerSpec` says how one layer is quantized (weight format and granularity, input
activation format, observers). A :class:`Plan` is an ordered list of :class:`Rule` s — a regex on
the module name (``re.fullmatch``), optional type names, and a spec (or ``None``: keep in FP);
the first matching rule wins and unmatched modules stay in FP. Named recipes (``w8a8``,
``w4a8``, …) expand to plans; the integer-program allocators of later methods emit plans too.

Diffusion defaults (Q-Diffusion, EfficientDM, ModelOpt's exclusion list): ``conv_in``,
``conv_out`` and the output norm stay in FP because they are small and their error spreads to
every later layer and timestep; a diffusion transformer's counterparts, the patch embedding
(``pos_embed``) and DiT's output projection ``proj_out_2``, likewise; norms are never quantized. A plain :meth:`Plan.uniform` keeps the
time embedding in FP too; the named recipes quantize it at 8 bits (``RECIPE_RULES``; W4A8's
``time_emb_proj`` at 5).
``exclude_defaults=False`` overrides all of that.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from torch import nn

from .calibration import _check_observer
from .errors import LowbitError, PlanError
from .formats import parse_optional
from .quantizer import Granularity

# pos_embed / proj_out_2: a DiT's first and last layers (diffusers' PatchEmbed conv; the Linear
# that writes the patches). Image SQNR vs FP32 on the benchmark DiT-S (zoo/dit_s, DDIM 5 steps,
# batch 4), W8A8 on: only the patch embedding 16.7 dB, only proj_out_2 25.8 dB, every layer
# 15.9 dB; the w8a8 recipe with them excluded 29.8 dB. They hold 0.03 % of its parameters. (A UNet's Transformer2DModel
# ``proj_out`` is an inner layer and stays quantized.)
DEFAULT_EXCLUDE = (
    r"(.*\.)?(time_embedding|time_emb_proj|time_proj|conv_in|conv_out|add_embedding|class_embedding|norm_out"
    r"|pos_embed|proj_out_2)(\..*)?"
)
QUANTIZABLE_TYPES = ("Linear", "Conv2d", "Attention")


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized. ``None`` formats (or ``"fp32"``) keep that tensor in float."""

    weight: str | None = None
    act: str | None = None
    weight_granularity: str = "channel"
    act_granularity: str = "tensor"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"

    def __post_init__(self) -> None:
        try:
            parse_optional(self.weight)
            parse_optional(self.act)
            Granularity.parse(self.weight_granularity)
            if Granularity.parse(self.act_granularity).kind != "tensor":
                raise PlanError(
                    f"activation granularity {self.act_granularity!r} is not supported: activations use static"
                    " per-tensor scales ('tensor')"
                )
            _check_observer(self.weight_observer)
            _check_observer(self.act_observer)
        except PlanError:
            raise
        except LowbitError as e:
            raise PlanError(f"invalid layer spec: {e}") from None

    @property
    def keeps_fp(self) -> bool:
        """True when neither weights nor activations are quantized."""
        return parse_optional(self.weight) is None and parse_optional(self.act) is None

    def describe(self) -> str:
        w = parse_optional(self.weight)
        a = parse_optional(self.act)
        return f"W:{w.name + '/' + Granularity.parse(self.weight_granularity).name if w else 'fp'} A:{a.name if a else 'fp'}"


@dataclass(frozen=True)
class Rule:
    """Modules whose name fully matches ``pattern`` (and whose class, or a base class, is named
    in ``types`` when given) get ``spec``; ``spec=None`` keeps them in FP."""

    pattern: str
    spec: LayerSpec | None
    types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise PlanError(f"rule pattern {self.pattern!r} is not a valid regex ({e}); escape dots as '\\.'") from None

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.types and not {c.__name__ for c in type(module).__mro__} & set(self.types):
            return False
        return re.fullmatch(self.pattern, name) is not None


@dataclass
class Plan:
    """An ordered list of rules; the first rule that matches a module decides its spec."""

    rules: list[Rule] = field(default_factory=list)
    name: str = "custom"

    def spec_for(self, name: str, module: nn.Module) -> LayerSpec | None:
        """The spec for one module, or ``None`` if it stays in FP."""
        if not is_quantizable(module):
            return None
        for rule in self.rules:
            if rule.matches(name, module):
                return None if rule.spec is None or rule.spec.keeps_fp else rule.spec
        return None

    def resolve(self, model: nn.Module) -> dict[str, LayerSpec]:
        """Every quantizable module of ``model`` that this plan quantizes, by name."""
        out = {}
        for name, mod in model.named_modules():
            spec = self.spec_for(name, mod)
            if spec is not None:
                out[name] = spec
        return out

    # JSON round trip ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "rules": [
            {"pattern": r.pattern, "types": list(r.types), "spec": asdict(r.spec) if r.spec else None}
            for r in self.rules]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        try:
            rules = [Rule(r["pattern"], LayerSpec(**r["spec"]) if r.get("spec") else None, tuple(r.get("types", ())))
                     for r in d["rules"]]
            return Plan(rules, d.get("name", "custom"))
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan: {e!r}; a plan is {{'name': ..., 'rules': [{{'pattern', 'types', 'spec'}}]}}") from None

    @staticmethod
    def from_json(text: str) -> "Plan":
        try:
            return Plan.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON ({e.msg} at char {e.pos})") from None

    @staticmethod
    def uniform(spec: LayerSpec, *, include: list[str] | None = None, exclude: list[str] | None = None,
                types: tuple[str, ...] = QUANTIZABLE_TYPES, exclude_defaults: bool = True,
                name: str = "custom") -> "Plan":
        """One spec for every matching layer: ``exclude`` regexes (plus the diffusion defaults)
        first, then ``include`` regexes (default: everything) restricted to ``types``."""
        rules = [Rule(p, None) for p in (exclude or [])]
        if exclude_defaults:
            rules.append(Rule(DEFAULT_EXCLUDE, None))
        rules += [Rule(p, spec, tuple(types)) for p in (include or [".*"])]
        return Plan(rules, name)


def is_quantizable(module: nn.Module) -> bool:
    """Linear, Conv2d, Embedding (weight-only), and diffusers attention modules (for their two
    matmuls). Uniform plans cover ``QUANTIZABLE_TYPES`` by default; the recipes add the
    embedding tables (``_embedding_rule``)."""
    return any(c.__name__ in QUANTIZABLE_TYPES + ("Embedding",) for c in type(module).__mro__) and (
        isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or hasattr(module, "get_attention_scores"))


# Recipes: name -> (one-line description, spec). Weights per-channel symmetric; activations
# per-tensor, asymmetric for INT (SiLU outputs are one-sided), symmetric for FP.
RECIPES: dict[str, tuple[str, LayerSpec]] = {
    "w8a8": ("INT8 per-channel weights, UINT8 per-tensor activations (incl. attention matmuls)",
             LayerSpec("int8", "uint8")),
    "w4a8": ("INT4 per-channel weights (MSE-clipped), UINT8 per-tensor activations",
             LayerSpec("int4", "uint8", weight_observer="mse")),
    "w4a16": ("INT4 per-channel weights (MSE-clipped), activations kept in float (weight-only)",
              LayerSpec("int4", None, weight_observer="mse")),
    "w4a4": ("INT4 per-channel weights, UINT4 per-tensor activations, both MSE-clipped",
             LayerSpec("int4", "uint4", weight_observer="mse", act_observer="mse")),
    "fp8": ("FP8 E4M3 per-channel weights and FP8 E4M3 per-tensor activations",
            LayerSpec("fp8_e4m3", "fp8_e4m3")),
    "w4a8-fp": ("FP4 E2M1 per-channel weights (MSE-searched scale), FP8 E4M3 per-tensor activations",
                LayerSpec("fp4_e2m1", "fp8_e4m3", weight_observer="mse")),
}


# The time embedding in every recipe: quantized, not kept FP32. In FP32 these Linears would be
# 29 % of the SD-like W4A8 checkpoint and 17 % of the W8A8 one, for 5 % of the parameters.
# The time-embedding MLP is at 8 bits, the "8 bit or higher" of METHODS.md §5 (EfficientDM,
# ModelOpt): W8A8 for INT recipes (an integer model stays integer: the layers run oneDNN int8
# like the rest), INT8 weight-only for the weight-only recipe, FP8 for minifloat ones. Each
# ResNet's ``time_emb_proj`` is too, except in W4A8, which puts it at INT5 (still W·A8, still
# run as int8).
# Measured on the bundled model:
# * image SQNR vs FP32 (256 images, DDIM 10, one calibration set): W8A8 22.43 dB with the time
#   embedding FP32 and 22.43 dB quantized; FP8 23.37 vs 23.75 dB; W4A8 10.14 dB with the
#   embedding MLP at 4 bits too;
# * W4A8's time_emb_proj bits, quick protocol and the demo's calibration (noise floor 0.11):
#   INT8 FID* 2.94, recall 0.609; INT6 2.99, 0.602; INT5 2.93, 0.603; INT4 3.24, 0.571
#   (FID*-to-FP 0.57–0.58 for all). Five bits is as good as eight; four is not. On the SD-like
#   UNet, INT5 takes the W4A8 checkpoint from 0.134 to 0.129 of fp32 bytes (INT6: 0.131).
TIME_EMBEDDING = r"(.*\.)?(time_emb_proj|time_embedding\.linear_\d+)"
TIME_EMB_PROJ = r"(.*\.)?time_emb_proj"
_TIME_SPEC = {"int": LayerSpec("int8", "uint8"), "weight-only": LayerSpec("int8", None),
              "fp": LayerSpec("fp8_e4m3", "fp8_e4m3")}


def _time_rules(spec: LayerSpec) -> tuple[Rule, ...]:
    w = parse_optional(spec.weight)
    if w is None:
        return ()
    kind = "weight-only" if parse_optional(spec.act) is None else w.kind
    return (Rule(TIME_EMBEDDING, _TIME_SPEC[kind], ("Linear",)),)


RECIPE_RULES: dict[str, tuple[Rule, ...]] = {name: _time_rules(spec) for name, (_, spec) in RECIPES.items()}
RECIPE_RULES["w4a8"] = (Rule(TIME_EMB_PROJ, LayerSpec("int5", "uint8", weight_observer="mse"), ("Linear",)),
                        *RECIPE_RULES["w4a8"])


# Embedding tables (DiT's per-block class-label tables: 12 % of a DiT-S-like model's
# parameters, a third of its W8A8 checkpoint while they stayed fp32) in every recipe, weight-only
# at 8 bits, like the time embedding: a lookup's output feeds the conditioning of every block.
# The default exclusions (a UNet's class_embedding, add_embedding) still keep theirs in float.
_EMBEDDING_SPEC = {"int": LayerSpec("int8"), "fp": LayerSpec("fp8_e4m3")}


def _embedding_rule(spec: LayerSpec) -> Rule | None:
    w = parse_optional(spec.weight)
    return None if w is None else Rule(".*", _EMBEDDING_SPEC[w.kind], ("Embedding",))


def recipe(name: str, **overrides) -> Plan:
    """The plan for a named recipe; keyword overrides go to :meth:`Plan.uniform`
    (``include``, ``exclude``, ``exclude_defaults``, ``types``). Every recipe also quantizes the
    time-embedding Linears at 8 bits (W4A8's ``time_emb_proj`` at 5; ``RECIPE_RULES``) and the
    embedding tables at 8 bits, weight-only (``_embedding_rule``), unless
    ``exclude_defaults=False`` (then every layer gets the recipe's spec)."""
    if name not in RECIPES:
        raise PlanError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)} or pass a Plan")
    plan = Plan.uniform(RECIPES[name][1], name=name, **overrides)
    if overrides.get("exclude_defaults", True):
        # after the user's excludes (which come first in a uniform plan), before the defaults
        n_user = len(overrides.get("exclude") or [])
        extra = list(RECIPE_RULES.get(name, ()))
        plan.rules[n_user:n_user] = extra
        emb = _embedding_rule(RECIPES[name][1])
        if emb is not None:  # after the default exclusions, before the recipe's own spec
            plan.rules.insert(n_user + len(extra) + 1, emb)
    return plan


def as_plan(plan_or_recipe: "Plan | str | LayerSpec") -> Plan:
    """Accept a Plan, a recipe name, or a single LayerSpec (applied uniformly)."""
    if isinstance(plan_or_recipe, Plan):
        return plan_or_recipe
    if isinstance(plan_or_recipe, LayerSpec):
        return Plan.uniform(plan_or_recipe)
    if isinstance(plan_or_recipe, str):
        return recipe(plan_or_recipe)
    raise PlanError(f"expected a Plan, a recipe name or a LayerSpec, got {type(plan_or_recipe).__name__}")
