#!/usr/bin/env node
// Reference client for a pvt-deploy export folder: decode an image the way the preprocessing contract says
// (stored pixels, no ICC conversion, no EXIF rotation unless input.preprocess.exif.apply_orientation), feed the
// uint8 [H, W, C] pixels to the image-input graphs, print top-k labels (and the embedding with --embed); answers
// from an untrained (--random-weights) export say so: a header line, or "random_weights": true in each JSON line.
//
//   node pvt_client.mjs MODEL_DIR IMAGE... [--top-k 5] [--embed] [--json]

import fs from "node:fs";
import path from "node:path";
import ort from "onnxruntime-node";
import { PNG } from "pngjs";
import sharp from "sharp";

export function readExport(modelDir) {
  const manifest = JSON.parse(fs.readFileSync(path.join(modelDir, "manifest.json"), "utf8"));
  const imageGraphs = manifest.image_graphs;
  if (!imageGraphs || !imageGraphs.classify) {
    throw new Error(`${modelDir}: no image-input graphs (export with a pvt-deploy that writes *.image.onnx)`);
  }
  const labels = manifest.labels ?? fs.readFileSync(path.join(modelDir, "labels.txt"), "utf8").split("\n").slice(0, -1);
  return { manifest, imageGraphs, labels, contract: manifest.input.preprocess };
}

// -> { data: Uint8Array, height, width, channels } in the layout the image graphs take. PNG: pngjs (pure JS,
// 8-bit PNGs decode to Pillow's values exactly); JPEG and the rest: sharp with ignoreIcc (libjpeg-turbo, the
// decoder Pillow uses: bit-exact on the repo photos; without ignoreIcc sharp converts colour profiles).
export async function decodeImage(buffer, name = "image") {
  if (buffer.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) {
    // pngjs expands gray and palette to RGBA (alpha 255 where opaque); the graph drops alpha, as the contract says
    const png = PNG.sync.read(buffer);
    return { data: new Uint8Array(png.data.buffer, png.data.byteOffset, png.data.length), height: png.height, width: png.width, channels: 4 };
  }
  let decoded;
  try {
    decoded = await sharp(buffer, { ignoreIcc: true, limitInputPixels: 89478485 }).raw().toBuffer({ resolveWithObject: true });
  } catch (error) {
    throw new Error(`${name}: cannot decode image (${error.message.split("\n")[0]})`);
  }
  const { data, info } = decoded;
  if (info.depth !== "uchar" || ![1, 3, 4].includes(info.channels)) {
    throw new Error(`${name}: ${info.channels}-channel ${info.depth} images are not supported by this client`);
  }
  return { data: new Uint8Array(data.buffer, data.byteOffset, data.length), height: info.height, width: info.width, channels: info.channels };
}

export class PvtClient {
  static async load(modelDir, options = {}) {
    const client = new PvtClient();
    client.export = readExport(modelDir);
    client.sessions = {};
    for (const [graph, entry] of Object.entries(client.export.imageGraphs)) {
      client.sessions[graph] = await ort.InferenceSession.create(path.join(modelDir, entry.file), {
        executionProviders: ["cpu"],
        intraOpNumThreads: options.threads ?? 1,
      });
    }
    return client;
  }

  async run(graph, image, outputs) {
    const tensor = new ort.Tensor("uint8", image.data, [image.height, image.width, image.channels]);
    const result = await this.sessions[graph].run({ image: tensor }, outputs);
    return Object.fromEntries(outputs.map((name) => [name, Array.from(result[name].data)]));
  }

  async classify(image, topK = 5) {
    const { probabilities } = await this.run("classify", image, ["probabilities"]);
    const order = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
    return { probabilities, top: order.slice(0, topK).map(([p, i]) => [this.export.labels[i], p]) };
  }

  async embed(image) {
    return (await this.run(this.sessions.embed ? "embed" : "classify", image, ["embedding"])).embedding;
  }
}

async function main(argv) {
  const args = argv.slice(2);
  const flag = (name) => {
    const index = args.indexOf(name);
    if (index < 0) return false;
    args.splice(index, 1);
    return true;
  };
  const option = (name, fallback) => {
    const index = args.indexOf(name);
    if (index < 0) return fallback;
    const value = args[index + 1];
    args.splice(index, 2);
    return value;
  };
  const topK = Number(option("--top-k", "5"));
  const withEmbedding = flag("--embed");
  const asJson = flag("--json");
  const [modelDir, ...images] = args;
  if (!modelDir || images.length === 0) {
    console.error("usage: node pvt_client.mjs MODEL_DIR IMAGE... [--top-k 5] [--embed] [--json]");
    return 2;
  }
  const client = await PvtClient.load(modelDir);
  // an export made with --random-weights says so in every answer, as pvt-deploy predict does
  const untrained = client.export.manifest.random_weights === true;
  if (untrained && !asJson) console.log("# RANDOM WEIGHTS (untrained): these answers are meaningless");
  for (const file of images) {
    const image = await decodeImage(fs.readFileSync(file), file);
    const { probabilities, top } = await client.classify(image, topK);
    const embedding = withEmbedding ? await client.embed(image) : undefined;
    if (asJson) {
      const marked = untrained ? { random_weights: true } : {};
      console.log(JSON.stringify({ image: file, top, probabilities, embedding, ...marked }));
    } else {
      console.log(`${file}: ${top.map(([label, p]) => `${label} ${p.toFixed(4)}`).join(", ")}`);
    }
  }
  return 0;
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith("pvt_client.mjs")) {
  main(process.argv).then(
    (code) => process.exit(code),
    (error) => {
      console.error(`Error: ${error.message}`);
      process.exit(1);
    },
  );
}
