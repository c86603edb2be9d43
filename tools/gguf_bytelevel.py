"""llama.cpp's convert_hf_to_gguf.py for checkpoints whose tokenizer is a plain ByteLevel BPE with the
GPT-2 regex that llama.cpp's pre-tokenizer hash table does not know (the random models of
`bench --shape` train their own such tokenizer, so their hash is in no table). An unknown hash is
written as llama.cpp's "gpt-2" pre-tokenizer when tokenizer.json says ByteLevel with the regex;
anything else keeps the converter's own error.

    python tools/gguf_bytelevel.py LLAMA_CPP_TREE HF_DIR --outtype bf16 --outfile OUT.bf16.gguf
    llama-quantize OUT.bf16.gguf OUT.gguf Q4_K_M

LLAMA_CPP_TREE: a llama.cpp source tree (../shared/tools/llamacpp.sh unpacks one under
~/.cache/llamacpp/src/llama_cpp_python-*/vendor/llama.cpp). The converter imports sentencepiece
even for checkpoints without tokenizer.model, so the Python running this needs it installed.
"""
import json
import runpy
import sys

tree = sys.argv[1]
sys.argv = [f"{tree}/convert_hf_to_gguf.py", *sys.argv[2:]]
sys.path[:0] = [tree, f"{tree}/gguf-py"]
import conversion.base as base  # noqa: E402  (the converter's own module, from the tree)

original = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((self.dir_model / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            print("gguf_bytelevel: unknown pre-tokenizer hash; tokenizer.json has a plain ByteLevel "
                  "pre-tokenizer with the GPT-2 regex: writing it as 'gpt-2'", file=sys.stderr)
            return "gpt-2"
        raise


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
