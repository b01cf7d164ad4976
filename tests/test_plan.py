"""Plans: rule matching, default diffusion exclusions, recipes, JSON round trip, errors."""

import pytest
from torch import nn

from lowbit import DEFAULT_EXCLUDE, RECIPES, LayerSpec, Plan, Rule, quantize, recipe
from lowbit.errors import FormatError, LowbitError, PlanError
from lowbit.plan import RECIPE_RULES
from lowbit.nn import QuantAttnProcessor, QuantConv2d, QuantLinear, quant_layers


def test_recipes_documented_and_valid():
    assert set(RECIPES) >= {"w8a8", "w4a8", "w4a16", "w4a4", "fp8", "w4a8-fp"}
    for name, (doc, _) in RECIPES.items():
        assert len(doc) > 20 and "\n" not in doc
        assert recipe(name).name == name


def test_plan_json_round_trip():
    plan = Plan([Rule(r"down\..*", LayerSpec("int4", "uint8", weight_granularity="group8")),
                 Rule(r".*attn.*", None), Rule(".*", LayerSpec("fp8_e4m3", "fp8_e5m2"), ("Linear",))], name="mine")
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()


def test_default_exclusions_keep_diffusion_io_float(unet, calib):
    quantize(unet, "w8a8", calib, progress=False)
    names = {n for n, _ in quant_layers(unet)}
    for n, m in unet.named_modules():
        if any(k in n for k in ("conv_in", "conv_out", "norm_out")):
            assert n not in names and not isinstance(m, (QuantConv2d, QuantLinear))
    assert any(isinstance(m, QuantAttnProcessor) for _, m in quant_layers(unet))
    assert any(isinstance(m, QuantConv2d) for _, m in quant_layers(unet))
    assert "down_blocks.0.resnets.0.conv1" in names


def test_default_exclusions_keep_a_dits_patch_embedding_and_output_projection_float():
    import diffusers

    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                          sample_size=8, patch_size=2, norm_num_groups=4)
    specs = recipe("w8a8").resolve(dit)
    assert "pos_embed.proj" not in specs and "proj_out_2" not in specs
    assert {"proj_out_1", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn1"} <= set(specs)
    # a UNet transformer's proj_out is an inner layer: still quantized
    unet = diffusers.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                          cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    assert "down_blocks.0.attentions.0.proj_out" in recipe("w8a8").resolve(unet)


def test_uniform_plans_keep_the_time_embedding_float(unet):
    specs = Plan.uniform(LayerSpec("int8", "uint8")).resolve(unet)
    assert specs and not [n for n in specs if "time_emb" in n or n.startswith(("conv_in", "conv_out"))]


@pytest.mark.parametrize("name, spec", [
    ("w8a8", LayerSpec("int8", "uint8")), ("w4a8", LayerSpec("int8", "uint8")), ("w4a4", LayerSpec("int8", "uint8")),
    ("w4a16", LayerSpec("int8", None)), ("fp8", LayerSpec("fp8_e4m3", "fp8_e4m3")),
    ("w4a8-fp", LayerSpec("fp8_e4m3", "fp8_e4m3")),
])
def test_recipes_quantize_the_time_embedding_at_eight_bits(unet, calib, name, spec):
    """The time-embedding MLP and every time_emb_proj at 8 bits (METHODS.md §5), in the recipe's
    kind (INT, weight-only or FP), but W4A8's time_emb_proj at INT5; conv_in/conv_out stay float."""
    assert set(RECIPE_RULES) == set(RECIPES)
    plan = recipe(name)
    proj = LayerSpec("int5", "uint8", weight_observer="mse") if name == "w4a8" else spec  # (see plan.py)
    for layer in ("time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.time_emb_proj"):
        assert plan.spec_for(layer, nn.Linear(4, 4)) == (proj if layer.endswith("proj") else spec), layer
    if name == "w4a8":  # and on a real UNet
        quantize(unet, plan, calib, progress=False)
        layers = dict(quant_layers(unet))
        temb = [n for n in layers if "time_emb" in n]
        assert "time_embedding.linear_1" in temb and any(n.endswith("time_emb_proj") for n in temb)
        assert all(layers[n].spec == (proj if n.endswith("time_emb_proj") else spec) for n in temb)
        assert layers["down_blocks.0.resnets.0.conv1"].spec.weight == "int4"
        assert not {"conv_in", "conv_out"} & set(layers)


def test_user_excludes_come_before_the_time_embedding_rules():
    plan = recipe("w4a8", exclude=[r".*time_emb_proj"])
    assert plan.spec_for("down_blocks.0.resnets.0.time_emb_proj", nn.Linear(4, 4)) is None
    assert plan.spec_for("time_embedding.linear_1", nn.Linear(4, 4)) == LayerSpec("int8", "uint8")


def test_exclude_defaults_can_be_overridden(unet, calib):
    quantize(unet, recipe("w8a8", exclude_defaults=False), calib, progress=False)
    names = {n for n, _ in quant_layers(unet)}
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= names


def test_include_exclude_and_types(unet):
    plan = Plan.uniform(LayerSpec("int4"), include=[r"up_blocks\..*"], exclude=[r".*conv_shortcut"], types=("Conv2d",))
    specs = plan.resolve(unet)
    assert specs and all(n.startswith("up_blocks.") for n in specs)
    assert not any(n.endswith("conv_shortcut") for n in specs)
    assert all(isinstance(unet.get_submodule(n), nn.Conv2d) for n in specs)


def test_first_matching_rule_wins():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    plan = Plan([Rule("0", LayerSpec("int8")), Rule(".*", LayerSpec("int4"))])
    assert {n: s.weight for n, s in plan.resolve(m).items()} == {"0": "int8", "1": "int4"}
    assert DEFAULT_EXCLUDE  # exported for users who build their own rules


@pytest.mark.parametrize("bad, err", [
    (lambda: recipe("w3a3"), "unknown recipe"),
    (lambda: LayerSpec("fp9_e9m9"), "out of range"),
    (lambda: LayerSpec("int4", act_granularity="channel"), "per-tensor"),
    (lambda: LayerSpec("int4", weight_observer="magic"), "unknown observer"),
    (lambda: Rule("([", None), "not a valid regex"),
    (lambda: Plan.from_json("{not json"), "not valid JSON"),
    (lambda: Plan.from_dict({"rules": [{"spec": None}]}), "malformed plan"),
])
def test_plan_errors_are_one_line_lowbit_errors(bad, err):
    with pytest.raises(LowbitError, match=err) as e:
        bad()
    assert "\n" not in str(e.value)


def test_group_size_must_divide_the_input_dimension():
    m = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(FormatError, match="group size 32 does not divide the input dimension 48"):
        quantize(m, Plan.uniform(LayerSpec("int4", weight_granularity="group32")))


def test_plan_matching_nothing_and_double_quantize_are_errors():
    m = nn.Sequential(nn.ReLU())
    with pytest.raises(PlanError, match="matches no"):
        quantize(m, "w4a16")
    m = nn.Sequential(nn.Linear(4, 4))
    quantize(m, "w4a16")
    with pytest.raises(PlanError, match="already quantized"):
        quantize(m, "w4a16")
