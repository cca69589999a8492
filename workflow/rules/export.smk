rule export:
    """A checkpoint as one GGUF file llama.cpp serves: plain GQA (llama) or per-layer KV-head counts (deci);
    a plan no engine serves is refused with one line. Not a default target: ask for the file, e.g.
    snakemake results/smoke/gguf/smollm2-135m/mqa/0.34/converted.q8_0.gguf"""
    input:
        checkpoint=path("checkpoint"),
        code=code("kvshare.export", "export"),
    output:
        path("gguf"),
    params:
        hydra=lambda wc: hydra("export", f"{wc.model}/{wc.method}/{wc.budget}/{wc.variant}/{wc.gguf_type}"),
    conda:
        "../../environment.yml"
    log:
        path("log", rule="export", name="{model}_{method}_{budget}_{variant}_{gguf_type}"),
    shell:
        "python -m kvshare.export {params.hydra} export.checkpoint={input.checkpoint} export.type={wildcards.gguf_type} "
        "export.variant={wildcards.variant} export.out={output} > {log} 2>&1"
