"""The docs page of both APIs: static HTML with an inline script that fetches the OpenAPI document from
`data-spec` and lists every operation (parameters, body, responses) and every schema. No build step, no CDN."""

# ruff: noqa: E501  (inline JavaScript reads better on long lines than wrapped inside a Python string)

# A dependency-free renderer: fetches the document and lists each operation with its parameters, body,
# responses and the schemas they reference (expandable). No build step, no CDN.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:1rem 1.5rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
details.op{border:1px solid #ccc;border-radius:6px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer}code,pre{font:13px ui-monospace,monospace}pre{background:#f6f6f6;padding:.5rem;overflow:auto}
.m{display:inline-block;min-width:4.2em;font-weight:bold;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.put{color:#a60}.delete{color:#c00}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
</style></head>
<body data-spec="{{SPEC}}"><h1>{{TITLE}}</h1><p id="info">Loading <a href="{{SPEC}}">{{SPEC}}</a>…</p>
<div id="ops"></div><h2>Schemas</h2><div id="schemas"></div>
<script>
"use strict";
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
};
const refName = (s) => (s && s.$ref ? s.$ref.split("/").pop() : null);
const schemaLink = (s) => {
  const name = refName(s);
  return name ? el("a", {href: "#schema-" + name}, name) : el("code", {}, JSON.stringify(s || {}));
};
const content = (c) => {
  const span = el("span");
  for (const [type, media] of Object.entries(c || {})) span.append(el("code", {}, type), " ", schemaLink(media.schema), " ");
  return span;
};
async function main() {
  const spec = await (await fetch(document.body.dataset.spec)).json();
  document.getElementById("info").textContent = `${spec.info.title} ${spec.info.version} — OpenAPI ${spec.openapi}. ${spec.info.description || ""}`;
  const ops = document.getElementById("ops");
  const schemes = spec.components.securitySchemes || {};
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const d = el("details", {class: "op"}, el("summary", {}, el("span", {class: "m " + method}, method), " ",
        el("code", {}, path), " — ", op.summary || ""));
      if (op.description) d.append(el("p", {}, op.description));
      const security = op.security || spec.security || [];
      const names = security.flatMap((s) => Object.keys(s));
      d.append(el("p", {}, "Auth: ", names.length ? names.map((n) => `${n} (${schemes[n].description || schemes[n].type})`).join(" or ") : "none"));
      if (op.parameters && op.parameters.length) {
        const t = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "schema"), el("th", {}, "description")));
        for (const p of op.parameters) t.append(el("tr", {}, el("td", {}, p.name + (p.required ? " *" : "")), el("td", {}, p.in), el("td", {}, schemaLink(p.schema)), el("td", {}, p.description || "")));
        d.append(t);
      }
      if (op.requestBody) d.append(el("p", {}, "Body: ", content(op.requestBody.content)));
      const t = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "body"), el("th", {}, "when")));
      for (const [status, r] of Object.entries(op.responses || {})) t.append(el("tr", {}, el("td", {}, status), el("td", {}, content(r.content)), el("td", {}, r.description || "")));
      d.append(t);
      ops.append(d);
    }
  }
  const schemas = document.getElementById("schemas");
  for (const [name, s] of Object.entries(spec.components.schemas)) {
    schemas.append(el("details", {class: "op", id: "schema-" + name}, el("summary", {}, el("code", {}, name)), el("pre", {}, JSON.stringify(s, null, 2))));
  }
  const target = location.hash && document.getElementById(location.hash.slice(1));
  if (target) target.open = true;
  window.addEventListener("hashchange", () => { const t = document.getElementById(location.hash.slice(1)); if (t) t.open = true; });
}
main().catch((e) => { document.getElementById("info").textContent = "Could not load the document: " + e; });
</script></body></html>
"""
