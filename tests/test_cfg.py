"""The cfg parser (``parser.c: read_cfg``, ``utils.c: strip``, ``option_list.c``), unused-key
warnings, profile detection, build-time resolution of shapes and indices, and the
official cfgs: ours equal the originals layer for layer, and every official cfg either
builds or is refused with an error that names what darknetpy does not support.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import textwrap
from pathlib import Path

import pytest

from darknetpy import CfgError, parse_architecture, parse_cfg, read_cfg, sections_to_text
from darknetpy.layers.conv import ConnectedSpec, ConvolutionalSpec
from darknetpy.layers.misc import SoftmaxSpec
from darknetpy.layers.pooling import AvgpoolSpec, MaxpoolSpec

REPO = Path(__file__).resolve().parents[1]
OUR_CFGS = sorted((REPO / "cfg").glob("*.cfg"))


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def arch(text: str, **kw):
    return parse_architecture(parse_cfg(dedent(text)), **kw)


NET = "[net]\nwidth=8\nheight=6\nchannels=3\n"


# --------------------------------------------------------------------------------------
# text -> sections
# --------------------------------------------------------------------------------------
def test_whitespace_is_removed_everywhere():
    secs = parse_cfg("[ n e t ]\n wid th = 4 16 \n\theight\t=\t8\n channels=3\n"
                     "[convolutional]\nactivation = lea ky\nanchors = 1, 2,  3 ,4\n")
    assert secs[0].type == "net"
    assert {k: o.value for k, o in secs[0].options.items()} == \
        {"width": "416", "height": "8", "channels": "3"}
    assert secs[1].options["activation"].value == "leaky"
    assert secs[1].floats("anchors") == [1, 2, 3, 4]


def test_comments_and_blank_lines_are_skipped():
    text = "# comment\n;another\n[net]\n  # indented comment\nwidth=4\n; x=1\n\nheight=4\n" \
           "channels=1\n"
    (net,) = parse_cfg(text)
    assert list(net.options) == ["width", "height", "channels"]
    assert net.options["height"].line == 8


def test_trailing_hash_comment_is_stripped_with_a_warning(caplog):
    text = NET + "[convolutional]\nfilters=16 # sixteen filters\nsize=3#three\n"
    with caplog.at_level(logging.WARNING, logger="darknetpy"):
        secs = parse_cfg(text, path="x.cfg")
    assert secs[1].options["filters"].value == "16"
    assert secs[1].options["size"].value == "3"
    msgs = [r.getMessage() for r in caplog.records]
    assert any("x.cfg:6" in m and "#" in m for m in msgs), msgs


def test_repeated_sections_are_separate_layers():
    secs = parse_cfg(NET + "[convolutional]\nfilters=1\n[maxpool]\n[convolutional]\nfilters=2\n")
    assert [s.type for s in secs] == ["net", "convolutional", "maxpool", "convolutional"]
    assert [s.index for s in secs] == [-1, 0, 1, 2]
    assert [s.line for s in secs] == [1, 5, 7, 8]
    assert secs[3].options["filters"].value == "2"


def test_duplicate_key_keeps_the_first_value_with_a_warning(caplog):
    text = NET + "[convolutional]\nfilters=4\nsize=1\nfilters=8\n"
    with caplog.at_level(logging.WARNING, logger="darknetpy"):
        secs = parse_cfg(text, path="d.cfg")
    assert secs[1].options["filters"].value == "4"
    assert secs[1].options["filters"].line == 6
    msgs = [r.getMessage() for r in caplog.records]
    assert any("d.cfg:8" in m and "filters" in m and "twice" in m for m in msgs), msgs
    a = parse_architecture(secs, warn=False)
    assert a.specs[0].filters == 4


@pytest.mark.parametrize("text,line", [
    (NET + "[convolutional]\nfilters\n", 6),           # no '='
    (NET + "[convolutional]\n=3\n", 6),                # no key
    ("width=3\n[net]\n", 1),                           # option outside any section
    (NET + "[convolutional\nfilters=1\n", 5),          # malformed header
    (NET + "[]\n", 5),
])
def test_malformed_lines_are_errors_with_line_numbers(text, line):
    with pytest.raises(CfgError) as e:
        parse_cfg(text, path="bad.cfg")
    assert e.value.path == "bad.cfg"
    assert e.value.line == line
    assert f"bad.cfg:{line}" in str(e.value)


def test_empty_file_is_an_error():
    with pytest.raises(CfgError):
        parse_cfg("# nothing\n\n")


def test_network_is_an_alias_of_net():
    a = arch("[network]\nwidth=4\nheight=4\nchannels=1\n[maxpool]\nsize=2\nstride=2\n")
    assert a.net.width == 4 and a.specs[0].out_shape == (1, 2, 2)


def test_section_aliases():
    a = arch(NET + "[conv]\nfilters=2\n[max]\n[avg]\n[conn]\noutput=3\n[soft]\n")
    assert [type(s) for s in a.specs] == [ConvolutionalSpec, MaxpoolSpec, AvgpoolSpec,
                                          ConnectedSpec, SoftmaxSpec]


def test_sections_to_text_round_trip():
    text = (REPO / "cfg" / "yolov3-tiny.cfg").read_text()
    secs = parse_cfg(text)
    again = parse_cfg(sections_to_text(secs))
    assert [(s.type, s.index, {k: o.value for k, o in s.options.items()}) for s in secs] == \
        [(s.type, s.index, {k: o.value for k, o in s.options.items()}) for s in again]
    a, b = parse_architecture(secs, warn=False), parse_architecture(again, warn=False)
    assert strip_lines(a.specs) == strip_lines(b.specs)


def test_read_cfg_missing_file_is_a_cfg_error(tmp_path):
    with pytest.raises(CfgError) as e:
        read_cfg(tmp_path / "nope.cfg")
    assert e.value.path == str(tmp_path / "nope.cfg")


def test_typed_getters():
    (sec,) = parse_cfg("[net]\na=3\nb=-1.5\nc=1,2,3,\nd=x\ne=1,,2\n")
    assert sec.int("a") == 3 and sec.float("b") == -1.5
    assert sec.ints("c") == [1, 2, 3]  # Darknet tolerates a trailing comma
    assert sec.int("missing", 7) == 7
    with pytest.raises(CfgError) as e:
        sec.int("d")
    assert e.value.key == "d" and e.value.line == 5
    with pytest.raises(CfgError) as e:
        sec.ints("e")
    assert e.value.key == "e" and e.value.line == 6
    with pytest.raises(CfgError) as e:
        sec.int("missing")
    assert e.value.key == "missing" and "missing" in str(e.value)


# --------------------------------------------------------------------------------------
# unused keys
# --------------------------------------------------------------------------------------
def test_unused_keys_are_reported_with_file_line_and_section(tmp_path, caplog):
    cfg = tmp_path / "u.cfg"
    cfg.write_text(dedent("""
        [net]
        width=8
        height=8
        channels=3
        batch=64
        subdivisions=16
        learning_rate=0.001
        momentum=0.9
        decay=0.0005
        max_batches=500200
        policy=steps
        steps=400000,450000
        scales=.1,.1
        hue=.1
        frobnicate=1

        [convolutional]
        filters=18
        size=1
        activation=linear
        fliters=3
        wobble=2

        [yolo]
        mask=0,1,2
        anchors=10,13, 16,30, 33,23
        classes=1
        num=3
        jitter=.3
        ignore_thresh=.7
        truth_thresh=1
        random=1
        """))
    with caplog.at_level(logging.WARNING, logger="darknetpy"):
        parse_architecture(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs
    net_msg, conv_msg = msgs
    assert f"{cfg}:1" in net_msg and "[net]" in net_msg and "frobnicate" in net_msg
    assert f"{cfg}:17" in conv_msg and "layer 0 [convolutional]" in conv_msg
    assert "fliters" in conv_msg and "wobble" in conv_msg
    for key in ("batch", "learning_rate", "steps", "hue", "jitter", "ignore_thresh", "random"):
        assert not any(re.search(rf"\b{key}\b", m) for m in msgs), key


def test_warn_false_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="darknetpy"):
        arch(NET + "[convolutional]\nnonsense=1\n", warn=False)
    assert not caplog.records


# --------------------------------------------------------------------------------------
# profile detection
# --------------------------------------------------------------------------------------
def test_plain_yolov3_is_pjreddie():
    a = parse_architecture(REPO / "cfg" / "yolov3.cfg", warn=False)
    assert a.profile == "pjreddie" and a.profile_reasons == []


@pytest.mark.parametrize("name", ["yolov4.cfg", "yolov4-tiny.cfg", "yolov7-tiny.cfg"])
def test_alexeyab_cfgs_are_detected(name):
    a = parse_architecture(REPO / "cfg" / name, warn=False)
    assert a.profile == "alexeyab" and a.profile_reasons


TWO_CONVS = "[convolutional]\nfilters=3\nactivation=linear\n" * 2


@pytest.mark.parametrize("layers,reason", [
    ("[convolutional]\nfilters=2\nactivation=mish\n", "mish"),
    ("[convolutional]\nfilters=2\nsize=3\nstride_x=2\nstride_y=1\npad=1\nactivation=linear\n",
     "stride_x"),
    ("[convolutional]\nfilters=2\nsize=3\npad=1\ndilation=2\nactivation=linear\n", "dilation"),
    ("[convolutional]\nfilters=4\nactivation=linear\n[route]\nlayers=-1\ngroups=2\ngroup_id=1\n",
     "groups"),
    (TWO_CONVS + "[sam]\nfrom=-2\n", "[sam]"),
    (TWO_CONVS + "[shortcut]\nfrom=-2\nweights_type=per_feature\n", "weights_type"),
    ("[maxpool]\nmaxpool_depth=1\nout_channels=1\n", "maxpool_depth"),
    ("[reorg3d]\nstride=2\n", "[reorg3d]"),
])
def test_alexeyab_only_options_choose_alexeyab_with_reasons(layers, reason):
    a = arch(NET + layers, warn=False)
    assert a.profile == "alexeyab"
    assert any(reason in r for r in a.profile_reasons), a.profile_reasons


def test_alexeyab_net_and_yolo_keys_choose_alexeyab():
    a = arch("[net]\nwidth=8\nheight=8\nchannels=21\nletter_box=1\n"
             "[yolo]\nmask=0,1,2\nanchors=1,1,2,2,3,3\nnum=3\nclasses=2\nscale_x_y=1.05\n",
             warn=False)
    assert a.profile == "alexeyab"
    assert any("[net]" in r and "letter_box" in r for r in a.profile_reasons)
    assert any("layer 0 [yolo]" in r and "scale_x_y" in r for r in a.profile_reasons)
    assert a.net.letter_box == 1


def test_explicit_profile_wins_and_unknown_is_refused():
    a = parse_architecture(REPO / "cfg" / "yolov3.cfg", profile="alexeyab", warn=False)
    assert a.profile == "alexeyab"
    with pytest.raises(ValueError):
        parse_architecture(REPO / "cfg" / "yolov3.cfg", profile="darknet", warn=False)


# --------------------------------------------------------------------------------------
# build-time resolution: sizes, indices
# --------------------------------------------------------------------------------------
def test_width_height_override():
    a = parse_architecture(REPO / "cfg" / "yolov3-tiny.cfg", width=320, height=256, warn=False)
    assert (a.net.width, a.net.height, a.net.channels) == (320, 256, 3)
    assert a.specs[0].in_shape == (3, 256, 320)
    heads = [a.specs[i].out_shape for i in a.heads]
    assert heads == [(255, 8, 10), (255, 16, 20)]
    b = parse_architecture(REPO / "cfg" / "yolov3-tiny.cfg", warn=False)
    assert (b.net.width, b.net.height) == (416, 416)


def test_relative_and_absolute_indices_are_resolved():
    a = arch(NET + """
        [convolutional]
        filters=2
        activation=linear
        [convolutional]
        filters=3
        activation=linear
        [convolutional]
        filters=2
        activation=linear
        [route]
        layers=-1,0,-2
        [shortcut]
        from=-3
        [route]
        layers=1
        [shortcut]
        from=0,-4
        """, warn=False)
    assert a.specs[3].refs == (2, 0, 1)
    assert a.specs[3].out_shape == (7, 6, 8)
    assert a.specs[4].refs == (1,)
    assert a.specs[5].refs == (1,)
    assert a.specs[6].refs == (0, 2)


def test_shapes_carry_from_layer_to_layer():
    a = parse_architecture(REPO / "cfg" / "yolov3.cfg", warn=False)
    for prev, spec in zip(a.specs, a.specs[1:]):
        assert spec.in_shape == prev.out_shape
    s = a.net.width // 32
    assert a.net.width == a.net.height
    assert [a.specs[i].out_shape for i in a.heads] == [(255, s, s), (255, 2 * s, 2 * s),
                                                       (255, 4 * s, 4 * s)]


# --------------------------------------------------------------------------------------
# the official cfgs (need the reference directory)
# --------------------------------------------------------------------------------------
def strip_lines(specs):
    return [dataclasses.replace(s, line=0) for s in specs]


def origin(path: Path) -> tuple[str, str]:
    """(Darknet, file name) from our cfg's header line
    ``# Origin: cfg/NAME of https://github.com/WHO/darknet``."""
    m = re.search(r"^# Origin:\s+cfg/(\S+) of https://github\.com/(\w+)/darknet",
                  path.read_text(), re.M)
    assert m, f"{path.name}: no '# Origin: cfg/<file> of https://github.com/<who>/darknet' line"
    return {"pjreddie": "pjreddie", "alexeyab": "alexeyab"}[m.group(2).lower()], m.group(1)


def test_our_cfgs_name_their_origin():
    assert OUR_CFGS
    for path in OUR_CFGS:
        origin(path)


@pytest.mark.parametrize("path", OUR_CFGS, ids=[p.stem for p in OUR_CFGS])
def test_our_cfg_equals_the_official_one(path, reference_dir):
    who, name = origin(path)
    official = reference_dir / "cfg" / who / name
    assert official.is_file(), official
    tree = str(reference_dir / "names" / "9k.tree")
    ours = parse_architecture(path, tree=tree, warn=False)
    theirs = parse_architecture(official, tree=tree, warn=False)
    assert (ours.net.width, ours.net.height, ours.net.channels) == \
        (theirs.net.width, theirs.net.height, theirs.net.channels)
    assert len(ours.specs) == len(theirs.specs)
    for a, b in zip(strip_lines(ours.specs), strip_lines(theirs.specs)):
        assert a == b, f"layer {a.index}: {a} != {b}"
    assert ours.profile == theirs.profile


#: Official cfgs darknetpy refuses, and a word the error must contain (the unsupported
#: layer type or option, or the broken key). Anything else must build.
EXPECTED_REFUSALS = {
    "pjreddie/go.cfg": "extra",                 # [reorg] extra=1
    "pjreddie/go.test.cfg": "extra",
    "pjreddie/gru.cfg": "[gru]",
    "pjreddie/rnn.cfg": "[rnn]",
    "pjreddie/rnn.train.cfg": "[rnn]",
    "pjreddie/t1.test.cfg": "[detection]",
    "pjreddie/yolov1-tiny.cfg": "[detection]",
    "pjreddie/yolov1.cfg": "[local]",
    "alexeyab/crnn.train.cfg": "[crnn]",
    "alexeyab/gru.cfg": "[gru]",
    "alexeyab/lstm.train.cfg": "[lstm]",
    "alexeyab/rnn.cfg": "[rnn]",
    "alexeyab/rnn.train.cfg": "[rnn]",
    "alexeyab/t1.test.cfg": "[detection]",
    "alexeyab/yolov3-tiny_occlusion_track.cfg": "[crnn]",
    "alexeyab/yolov4-tiny_contrastive.cfg": "[contrastive]",
    "alexeyab/darknet53_448_xnor.cfg": "xnor",
    "alexeyab/tiny-yolo_xnor.cfg": "xnor",
    "alexeyab/yolov3-tiny_xnor.cfg": "xnor",
    # broken upstream: mask 16..19 with num=16 (Darknet reads past its anchors), and
    # "61,45    61,45" which whitespace removal turns into 61,4561,45 (31 values)
    "alexeyab/cspx-p7-mish.cfg": "mask",
    "alexeyab/cspx-p7-mish_hp.cfg": "anchors",
}


@pytest.mark.parametrize("who", ["pjreddie", "alexeyab", "real"])
def test_every_official_cfg_builds_or_names_what_is_unsupported(who, reference_dir):
    folder = reference_dir / "cfg" / who
    files = sorted(folder.glob("*.cfg"))
    assert files, folder
    tree = str(reference_dir / "names" / "9k.tree")
    problems = []
    for path in files:
        key = f"{who}/{path.name}"
        try:
            a = parse_architecture(path, tree=tree, warn=False)
        except CfgError as e:
            word = EXPECTED_REFUSALS.get(key)
            if word is None:
                problems.append(f"{key}: unexpected error: {e}")
            elif word not in str(e) or e.path != str(path) or e.line is None:
                problems.append(f"{key}: error should name {word!r} with file and line: {e}")
            continue
        if key in EXPECTED_REFUSALS:
            problems.append(f"{key}: builds now; update EXPECTED_REFUSALS")
        elif not a.specs:
            problems.append(f"{key}: no layers")
    assert not problems, "\n".join(problems)
