// Embeds a molecule with a stock @grpc/grpc-js client. The API is loaded from the repository's
// protos/ folder alone (it carries the google/rpc protos it imports), as a client in any
// language would compile it.
//
//   node embed_molecule.js [target] [smiles] [model]
//   QUOTIENT_API_KEY=...      sends "authorization: Bearer <key>"
//   QUOTIENT_TLS_CA_FILE=...  connects over TLS, verifying the server against that CA bundle
//
// Prints one JSON line: model, projection, invariant, dimension and the embedding's values.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

function main() {
  const [target = "127.0.0.1:50051", smiles = "CCO", model = "qm9-vae"] = process.argv.slice(2);
  const definition = protoLoader.loadSync("quotient/v1/embedding_service.proto", {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const api = grpc.loadPackageDefinition(definition).quotient.v1;
  const caFile = process.env.QUOTIENT_TLS_CA_FILE;
  const credentials = caFile
    ? grpc.credentials.createSsl(fs.readFileSync(caFile))
    : grpc.credentials.createInsecure();
  const client = new api.EmbeddingService(target, credentials);
  const metadata = new grpc.Metadata();
  if (process.env.QUOTIENT_API_KEY) {
    metadata.set("authorization", `Bearer ${process.env.QUOTIENT_API_KEY}`);
  }
  const request = { model, inputs: [{ molecule: { smiles } }], request_id: "node-1" };
  const deadline = new Date(Date.now() + 30000);
  client.Embed(request, metadata, { deadline }, (err, reply) => {
    if (err) {
      console.error(`Embed failed: ${grpc.status[err.code]}: ${err.details}`);
      process.exit(1);
    }
    const values = reply.embeddings[0].values;
    console.log(
      JSON.stringify({
        model: reply.model,
        projection: reply.projection,
        invariant: reply.invariant,
        request_id: reply.request_id,
        dimension: values.length,
        values,
      }),
    );
    client.close();
  });
}

main();
