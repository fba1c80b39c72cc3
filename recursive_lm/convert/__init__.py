"""Converting pretrained transformers (GGUF, Hugging Face safetensors) into this
package's models, vanilla or relaxed recursive:

  python -m recursive_lm.convert --source gguf:model.gguf --workdir runs/rrt \
      --plan cycle --repeats 2 --init average --lora_rank 64

readers.py   GGUF / safetensors -> `Source` (float32 numpy, our conventions)
build.py     Source -> parameters under a depth plan (init rules, SVD LoRA)
workdir.py   a step-0 run directory that train / evaluate / sample continue
tokenizer.py the GGUF tokenizer as a `tokenizers.Tokenizer` (spec gguf:PATH)
"""
