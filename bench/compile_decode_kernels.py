"""Compile the fused decode kernels for sm_90 (H100/H200) on a machine without a GPU.

    python bench/compile_decode_kernels.py

The Triton interpreter (CI) runs the kernels' logic but never compiles them; this builds each
variant the decode step launches (decode_linear's epilogues, split-K on and off, static and paged,
bf16 and fp32; the embedding; decode attention with the fused combine) to PTX and a cubin with the
ptxas bundled in the Triton wheel, so a codegen error shows up before a GPU run. Prints OK/FAIL per
variant and the split-K path's memory-ordering instructions (acq_rel atomic, barriers, L2 loads).
"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import gptcore.kernels.decode_linear as dl
import gptcore.kernels.decode_attention as da

target = GPUTarget("cuda", 90, 32)

def comp(kfn, sig, consts, name):
    fn = kfn.fn if hasattr(kfn, "fn") else kfn
    names = fn.arg_names
    signature = {}
    for n in names:
        if n in consts:
            signature[n] = "constexpr"
        else:
            signature[n] = sig.get(n, "i32")
    src = ASTSource(fn=fn, signature=signature, constexprs={n: v for n, v in consts.items()})
    try:
        triton.compile(src, target=target)
        print("OK", name)
    except Exception as e:
        print("FAIL", name, type(e).__name__, str(e)[:3000])

ptr = {n: "*fp32" for n in ["X", "LnW", "LnB", "Bias", "Res", "Out", "Ws", "PVal"]}
def skinny(wdt, xdt, epi, split, bm, bn, ln, paged=False, bias=True):
    sig = dict(ptr)
    sig.update({"X": f"*{xdt}", "LnW": f"*{wdt}", "LnB": f"*{wdt}", "W": f"*{wdt}", "Bias": f"*{wdt}",
                "Res": "*fp32", "Out": "*fp32" if epi in (0, 2) else f"*{wdt}", "Ws": "*fp32", "Cnt": "*i32",
                "Q": f"*{wdt}", "KC": f"*{wdt}", "VC": f"*{wdt}", "Lens": "*i64", "Table": "*i32" if paged else "*i64",
                "PVal": "*fp32", "PIdx": "*i32", "Tok": "*i64", "eps": "fp32"})
    consts = dict(K_SPLIT=128 * 2, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, PRO_LN=ln, HAS_BIAS=bias,
                  EPI=epi, STORE_OUT=True, IEEE=wdt == "fp32", PAGE=16 if paged else 1, PAGED=paged,
                  BLOCK_T=max(16, 4096 // bm), BLOCK_KS=max(128, 8192 // bm))
    comp(dl._skinny_kernel, sig, consts, f"skinny w={wdt} epi={epi} split={split} bm={bm} bn={bn} ln={ln} paged={paged}")

for wdt in ("bf16", "fp32"):
    skinny(wdt, "fp32", 3, 2, 16, 16, True)
    skinny(wdt, "fp32", 3, 1, 16, 16, True, paged=True)
    skinny(wdt, wdt, 2, 6, 16, 16, False)
    skinny(wdt, "fp32", 1, 2, 32, 32, True)
    skinny(wdt, wdt, 2, 1, 64, 64, False)
    skinny(wdt, "fp32", 4, 1, 16, 64, True, bias=False)
    skinny(wdt, "fp32", 0, 3, 16, 16, True)
comp(dl._embed_kernel, {"Tok": "*i64", "Wte": "*bf16", "Wpe": "*bf16", "Lens": "*i64", "Write": "*i64", "Out": "*fp32"},
     dict(HAS_WPE=True, BLOCK_C=1024), "embed")
sig = {n: "*bf16" for n in ["Q", "K", "V", "Out", "KNew", "VNew"]}
sig.update({"Lens": "*i64", "BlockTable": "*i32", "PartAcc": "*fp32", "PartMax": "*fp32", "PartSum": "*fp32", "Cnt": "*i32",
            "qk_scale": "fp32"})
for paged in (False, True):
    comp(da._split_kernel, sig, dict(SPLIT_LEN=64, NUM_SPLITS=3, BLOCK_N=64, BLOCK_D=64, PAGE=16 if paged else 1, PAGED=paged,
                                     APPEND=False, FUSED_COMBINE=True, BLOCK_S=4), f"attention fused combine paged={paged}")

sig = dict(ptr)
sig.update({"X": "*fp32", "LnW": "*bf16", "LnB": "*bf16", "W": "*bf16", "Bias": "*bf16", "Out": "*bf16", "Cnt": "*i32",
            "Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "Lens": "*i64", "Table": "*i64", "PIdx": "*i32", "Tok": "*i64", "eps": "fp32"})
fn = dl._skinny_kernel.fn
consts = dict(K_SPLIT=256, SPLIT_K=3, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, PRO_LN=True, HAS_BIAS=True, EPI=1, STORE_OUT=True,
              IEEE=False, PAGE=1, PAGED=False, BLOCK_T=256, BLOCK_KS=512)
signature = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in fn.arg_names}
k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
ptx = k.asm["ptx"]
print("split-K ordering:", [l.strip() for l in ptx.splitlines() if "atom" in l or "bar.sync" in l or "fence" in l or "ld.global.cg" in l][:20])
print("mma" , sum("mma" in l for l in ptx.splitlines()), "wgmma", sum("wgmma" in l for l in ptx.splitlines()))
