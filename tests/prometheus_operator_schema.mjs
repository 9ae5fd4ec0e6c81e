// Validates Prometheus Operator objects against the operator's own API schemas, as compiled into the npm
// package @kubernetes-models/prometheus-operator (scripts/install-kube-tools.sh puts it in .tools/node).
// Usage: node prometheus_operator_schema.mjs NODE_MODULES_DIR < objects.json (a JSON array);
// prints a JSON array with, per object, its schema errors (empty when valid).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const object of objects) {
  const [group, version] = object.apiVersion.split("/");
  const file = join(modules, "@kubernetes-models/prometheus-operator", group, version, `${object.kind}.js`);
  try {
    const model = (await import(pathToFileURL(file).href))[object.kind];
    new model(object).validate();
    results.push([]);
  } catch (error) {
    results.push([String(error.message ?? error)]);
  }
}
console.log(JSON.stringify(results));
