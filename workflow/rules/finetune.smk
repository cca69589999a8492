rule finetune:
    """Uptrain a converted checkpoint with the LM loss on the corpus (the same tokens for every variant)."""
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/converted",
        data=f"resources/data/{{model}}/{DATA}",
        code=code("finetune", "training", "modeling", "data", "models"),
    output:
        directory(f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/finetuned"),
    params:
        hydra=lambda wc: hydra("finetune", f"{wc.model}/{wc.method}/{wc.budget}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/finetune/{{model}}_{{method}}_{{budget}}.log",
    benchmark:
        f"{LOGS}/benchmarks/finetune/{{model}}_{{method}}_{{budget}}.tsv"
    resources:
        gpu=1,
    shell:
        "python -m kvshare.finetune {params.hydra} model={wildcards.model} finetune.checkpoint={input.checkpoint} "
        "finetune.data_dir={input.data} finetune.out={output} > {log} 2>&1"
