import subprocess
import sys


def test_import_does_not_pull_optional_dependencies() -> None:
    code = (
        "import sys, torchslim; torchslim.list_methods(); "
        "heavy = {'onnx', 'onnxruntime', 'onnxscript', 'transformers', 'torchvision', 'matplotlib'}; "
        "bad = heavy & {m.split('.')[0] for m in sys.modules}; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
