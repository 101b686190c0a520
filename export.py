"""Export the recognizer (backbone + CTC head, no LLM) to ONNX and check it against PyTorch, or as a model folder.

    python export.py config.yaml resume=run/best.pt [out.onnx]      # default: model.onnx beside the checkpoint
    python export.py config.yaml resume=run/best.pt export.int8=true   # model.int8.onnx, calibrated on real lines
    python export.py config.yaml resume=run/best.pt export.format=folder [OUT_DIR]   # default: run/hf_model/

The graph maps `images` (B, 1, H, W) float32 to `log_probs` (B, T, K) (log-softmax, class 0 = CTC blank) with a
dynamic batch axis; the charset and preprocessing sizes go into the file's metadata (read by htr/onnx_runtime.py).
Uses the TorchScript exporter (dynamo=False): the torch.export-based one needs onnxscript, not a dependency here.
export.int8 quantizes the convolutions statically (onnxruntime.quantization); benchmark.py times both files.
export.format=folder writes a model folder (htr/model_folder.py: safetensors weights, config.yaml, charset.txt, the LM
if the run has one, a model card README.md) that `hf upload USER/NAME OUT_DIR` publishes as it is.
"""
from htr.onnx_export import export_model
from utils import config_from_cli, run_main


def main(argv=None):
    cfg, outputs = config_from_cli(argv, "export.py", need_resume=True, positionals=True)
    print(export_model(cfg, outputs))


if __name__ == "__main__":
    run_main(main)
