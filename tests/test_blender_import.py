"""Exports open correctly in Blender: texture loaded, our +Z front is Blender's front (-Y), up is +Z.

Runs headless Blender (Debian's blender 3.4: ``blender -b --python-expr``);
skipped when ``blender`` is not on PATH.
"""

import json
import shutil
import subprocess

import pytest
from test_exports_writers import BOX, asymmetric_density, front_red_back_blue

from recon.exports import ExportConfig, export_field

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("blender") is None, reason="blender not on PATH")]

SCRIPT = r"""
import json, sys, bpy
import numpy
if not hasattr(numpy, "bool"):  # Debian's Blender 3.4 glTF importer calls numpy.bool, removed in numpy 1.24
    numpy.bool = bool
path = sys.argv[sys.argv.index("--") + 1]
bpy.ops.wm.read_factory_settings(use_empty=True)
if path.endswith(".glb"):
    bpy.ops.import_scene.gltf(filepath=path)
elif hasattr(bpy.ops.wm, "obj_import"):
    bpy.ops.wm.obj_import(filepath=path)
else:
    bpy.ops.import_scene.obj(filepath=path)
obj = next(o for o in bpy.context.scene.objects if o.type == "MESH")
mesh = obj.data
world = [obj.matrix_world @ v.co for v in mesh.vertices]
material = obj.active_material
images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image is not None]
image = images[0] if images else None
result = {
    "name": obj.name,
    "material": material.name,
    "image": image.name if image else None,
    "image_size": list(image.size) if image else None,
    "min": [min(p[i] for p in world) for i in range(3)],
    "max": [max(p[i] for p in world) for i in range(3)],
}
if image:
    w, h = image.size
    pixels = image.pixels[:]
    uv = mesh.uv_layers.active.data
    def colour_at(select):
        sums, count = [0.0, 0.0, 0.0], 0
        for poly in mesh.polygons:
            centre = sum((world[mesh.loops[i].vertex_index] for i in poly.loop_indices), world[0] * 0) / len(poly.loop_indices)
            if select(centre):
                u = sum(uv[i].uv[0] for i in poly.loop_indices) / len(poly.loop_indices)
                v = sum(uv[i].uv[1] for i in poly.loop_indices) / len(poly.loop_indices)
                x, y = min(int(u * w), w - 1), min(int(v * h), h - 1)
                k = 4 * (y * w + x)
                sums = [s + pixels[k + c] for c, s in enumerate(sums)]
                count += 1
        return [s / max(count, 1) for s in sums]
    result["front_colour"] = colour_at(lambda c: c.y < -0.3)
    result["back_colour"] = colour_at(lambda c: c.y > 0.3)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blender")
    cfg = ExportConfig(formats=["glb", "obj"], mc_resolution=40, target_faces=2000, texture_resolution=128, texture_padding=2)
    return export_field(asymmetric_density, front_red_back_blue, BOX, folder, cfg, stem="critter")


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_blender_imports_export(exported, fmt):
    run = subprocess.run(
        ["blender", "-b", "--factory-startup", "--python-expr", SCRIPT, "--", str(exported[fmt])],
        capture_output=True, text=True, timeout=170, check=False,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"blender failed ({run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    print(fmt, result)
    assert result["image"] is not None and result["image_size"] == [128, 128]
    # Blender is Z-up; the importers turn glTF/OBJ's Y-up frame so that our +Z (front) is Blender's -Y.
    assert result["min"][1] == pytest.approx(-0.60, abs=0.04)  # nose towards the front view
    assert result["max"][2] == pytest.approx(0.55, abs=0.04)  # ear up
    assert result["min"][2] == pytest.approx(-0.45, abs=0.04) and result["max"][1] == pytest.approx(0.45, abs=0.04)
    front, back = result["front_colour"], result["back_colour"]
    assert front[0] > 0.8 and front[2] < 0.2, front  # red front
    assert back[2] > 0.8 and back[0] < 0.2, back  # blue back
