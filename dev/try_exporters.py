"""Scratch: does each exporter give a graph that runs at batch 1,2,3,7 and other sizes?"""
import sys, time, warnings
import numpy as np, torch, onnxruntime as ort
from pvt_deploy.model.pvt_v2 import create_model
from pvt_deploy.export.graphs import wrap, reference_outputs
from pvt_deploy.manifest import GRAPH_OUTPUTS
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
net, size, dyn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "dyn"
torch.manual_seed(0)
m = create_model(net, 10, size=(size, size)).eval()
for exporter in ["torchscript", "dynamo"]:
    for graph in ["classify", "features"]:
        path = f"/tmp/exp_{exporter}_{graph}.onnx"
        x = torch.randn(2, 3, size, size)
        outs = GRAPH_OUTPUTS[graph]
        t0 = time.time()
        try:
            if exporter == "dynamo":
                B = torch.export.Dim("batch", min=1, max=1024)
                ds = {0: B}
                if dyn:
                    ds[2] = 32 * torch.export.Dim("h32", min=1, max=64)
                    ds[3] = 32 * torch.export.Dim("w32", min=1, max=64)
                torch.onnx.export(wrap(m, graph), (x,), path, input_names=["input"], output_names=list(outs),
                                  dynamo=True, dynamic_shapes={"x": ds}, external_data=False, opset_version=18)
            else:
                axes = {"input": {0: "batch"} | ({2: "height", 3: "width"} if dyn else {})}
                for o in outs: axes[o] = {0: "batch"}
                torch.onnx.export(wrap(m, graph), (x,), path, input_names=["input"], output_names=list(outs),
                                  dynamo=False, dynamic_axes=axes, opset_version=17)
        except Exception as e:
            print(exporter, graph, "EXPORT FAIL", type(e).__name__, str(e)[:300]); continue
        print(exporter, graph, f"export {time.time()-t0:.1f}s")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        sizes = [size] + ([size - 32, size + 32, size+64] if dyn else [])
        for s in sizes:
            for b in [1, 2, 3, 7]:
                xi = torch.randn(b, 3, s, s)
                ref = reference_outputs(m, graph, xi)
                try:
                    got = sess.run(None, {"input": xi.numpy()})
                    d = max(float(np.abs(g - ref[n].numpy()).max()) for g, n in zip(got, outs))
                    print(f"  s={s} b={b} maxdiff={d:.2e}")
                except Exception as e:
                    print(f"  s={s} b={b} RUN FAIL {str(e)[:200]}")
