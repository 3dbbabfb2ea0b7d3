/* The explorer's pages: each fills <main> from the JSON API (the same one documented at /docs).
   Text is set with textContent (never parsed as HTML); the one exception is an exemplar's
   heat-map, which the server renders with every token HTML-escaped. Nothing is fetched but
   this server's own /api. */
"use strict";

const main = document.getElementById("main");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function num(value, digits = 3) {
  return value === null || value === undefined || Number.isNaN(value) ? "-" : Number(value).toFixed(digits);
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function showError(where, err) {
  where.replaceChildren(el("p", {class: "error", text: err.message || String(err)}));
}

function table(header, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, header.map(h => el("th", {text: h})))),
    el("tbody", {}, rows.map(row => el("tr", {}, row.map(cell =>
      cell instanceof Node ? el("td", {}, cell) :
      typeof cell === "number" ? el("td", {class: "n", text: Number.isInteger(cell) ? String(cell) : num(cell)}) :
      el("td", {text: cell === null || cell === undefined ? "-" : String(cell)}))))));
}

function featureLabel(kind, layer, index, polarity) {
  return `${kind === "neuron" ? "neuron" : kind + " latent"} L${layer}/${index} ${polarity}`;
}

/* -- search ------------------------------------------------------------------------------ */

async function searchPage() {
  const params = new URLSearchParams(location.search);
  const form = el("form", {class: "search", id: "search-form"});
  const field = (label, input) => el("label", {}, label, input);
  const select = (name, options) => el("select", {name}, options.map(([value, text]) =>
    el("option", {value, text, selected: params.get(name) === value ? "selected" : null})));
  const q = el("input", {name: "q", type: "search", placeholder: "closing brackets in code", value: params.get("q") || "", autofocus: "autofocus"});
  let choices = {layers: [], polarities: ["pos", "neg"], kinds: ["neuron"], simulators: []};
  try { choices = await api("/api/filters"); } catch (e) { /* the search itself will say what is missing */ }
  form.append(
    field("search", q),
    field("by", select("mode", [["semantic", "meaning"], ["text", "words (BM25)"]])),
    field("layer", select("layer", [["", "any"], ...choices.layers.map(l => [String(l), String(l)])])),
    field("polarity", select("polarity", [["", "any"], ...choices.polarities.map(p => [p, p])])),
    field("kind", select("kind", [["", "any"], ...choices.kinds.map(k => [k, k])])),
    field("min score", el("input", {name: "min_score", type: "number", step: "any", size: 6, value: params.get("min_score") || ""})),
    field("max score", el("input", {name: "max_score", type: "number", step: "any", size: 6, value: params.get("max_score") || ""})),
    field("simulator", select("simulator", [["", "any"], ...choices.simulators.filter(s => s).map(s => [s, s])])),
    el("button", {type: "submit", text: "Search"}));
  form.addEventListener("submit", event => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [key, value] of new FormData(form)) if (String(value).trim() !== "") next.set(key, value);
    location.search = next.toString();
  });
  const results = el("div", {id: "results"});
  main.replaceChildren(el("h1", {text: "Search the descriptions"}), form, results);
  if (!params.get("q")) {
    results.append(el("p", {class: "muted", text: "By meaning (sentence vectors) or by words (BM25); every hit opens its feature's page."}));
    return;
  }
  const page = Number(params.get("page") || "1");
  const query = new URLSearchParams(params);
  query.set("page", String(page));
  try {
    const found = await api("/api/search?" + query.toString());
    results.append(el("p", {class: "muted", text: `page ${found.page}, ${found.hits.length} hits (${found.method})` +
      (found.notes.length ? " · " + found.notes.join("; ") : "")}));
    if (!found.hits.length) results.append(el("p", {text: "no description matches; loosen the filters or try other words"}));
    for (const hit of found.hits) {
      results.append(el("div", {class: "hit"},
        el("span", {class: "muted", text: `${hit.rank}. `}),
        el("a", {href: hit.page, class: "hit-link", text: hit.description}),
        el("div", {class: "where", text: `${featureLabel(hit.kind, hit.layer, hit.neuron, hit.polarity)} · ` +
          `${hit.source}${hit.candidate !== null && hit.source === "candidate" ? " #" + hit.candidate : ""} · ` +
          `match ${num(hit.match)} · test score ${num(hit.score)}`})));
    }
    const pager = el("div", {class: "pager"});
    const go = p => { const next = new URLSearchParams(params); next.set("page", String(p)); return "?" + next.toString(); };
    if (page > 1) pager.append(el("a", {href: go(page - 1), text: "← previous"}));
    pager.append(el("span", {text: `page ${page}`}));
    if (found.has_more) pager.append(el("a", {href: go(page + 1), id: "next-page", text: "next →"}));
    results.append(pager);
  } catch (err) { showError(results, err); }
}

/* -- a feature ------------------------------------------------------------------------------ */

function histogram(data, rgb) {
  const {edges, shares} = data;
  if (!shares.length) return el("p", {class: "muted", text: "no token sample in the statistics"});
  const width = 480, height = 120, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "hist"); svg.setAttribute("width", width); svg.setAttribute("height", height + 18);
  svg.style.setProperty("--rgb", rgb.join(","));
  const lo = edges[0], hi = edges[edges.length - 1], span = hi - lo || 1;
  const x = v => ((v - lo) / span) * (width - 2) + 1;
  const dens = shares.map((s, i) => s / Math.max(edges[i + 1] - edges[i], 1e-12));
  const top = Math.log10(Math.max(...dens) + 1e-12), bottom = Math.log10(Math.min(...dens) + 1e-12) - 0.5;
  shares.forEach((share, i) => {
    const h = Math.max(2, ((Math.log10(dens[i] + 1e-12) - bottom) / Math.max(top - bottom, 1e-9)) * height);
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x(edges[i])); rect.setAttribute("width", Math.max(1, x(edges[i + 1]) - x(edges[i]) - 1));
    rect.setAttribute("y", height - h); rect.setAttribute("height", h);
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${num(edges[i])} to ${num(edges[i + 1])}: ${(share * 100).toFixed(1)}% of tokens`;
    rect.append(tip); svg.append(rect);
  });
  if (data.mean !== null && data.mean >= lo && data.mean <= hi) {
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", x(data.mean)); line.setAttribute("x2", x(data.mean)); line.setAttribute("y1", 0); line.setAttribute("y2", height);
    svg.append(line);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 0); label.setAttribute("y", height + 14); label.setAttribute("font-size", "11");
  label.textContent = `${num(lo)} … ${num(hi)} (max) · height: token density, log · line: mean`;
  svg.append(label);
  return svg;
}

function exemplarBlock(feature) {
  const splits = Object.keys(feature.exemplars);
  const holder = el("div", {id: "exemplars"});
  const tabs = el("div", {class: "tabs"});
  const show = split => {
    tabs.querySelectorAll("button").forEach(b => b.classList.toggle("on", b.dataset.split === split));
    const parts = [];
    for (const [sample, rows] of Object.entries(feature.exemplars[split])) {
      if (!rows.length) continue;
      const label = {top: "top", quantile: "by activation decile (lowest first)", random: "random", quiet: "quiet (not activating)"}[sample] || sample;
      parts.push(el("h3", {text: `${label} · ${split}`}));
      for (const row of rows) {
        const line = el("div", {class: "ex", "data-sample": sample},
          el("span", {class: "meta", text: `${sample === "quantile" ? "bin " + row.bin : "#" + row.rank} · max ${num(row.extreme)}`}));
        const tokens = document.createElement("span");
        tokens.innerHTML = row.html;  // rendered by the server; every token HTML-escaped
        line.append(tokens);
        parts.push(line);
      }
    }
    holder.replaceChildren(...(parts.length ? parts : [el("p", {class: "muted", text: "no exemplars of this split"})]));
  };
  for (const split of splits) tabs.append(el("button", {type: "button", "data-split": split, text: split, onclick: () => show(split)}));
  show(splits.includes("train") ? "train" : splits[0]);
  return el("div", {}, tabs, holder);
}

function scoresTable(feature) {
  const scorers = feature.scorers;
  const header = ["", "candidate"];
  for (const s of scorers) { const l = s.scorer + (s.simulator ? ` (${s.simulator})` : ""); header.push(`${l} val`, `${l} test`); }
  header.push("description");
  const score = (c, s, split) => {
    const found = c.scores.find(x => x.scorer === s.scorer && (x.simulator || null) === (s.simulator || null) && x.split === split);
    return found ? found.score : null;
  };
  const row = (c, mark, name) => [mark, name, ...scorers.flatMap(s => [score(c, s, "val"), score(c, s, "test")]).map(v => v === null ? "-" : v),
    c.description !== null ? c.description : `(failed: ${c.failure})`];
  const rows = feature.candidates.map(c => row(c, c.selected ? "*" : "", `#${c.number}`));
  if (feature.control) rows.push(row(feature.control, "", `control (from ${feature.control.source_neuron})`));
  const t = table(header, rows); t.id = "candidates"; return t;
}

function rowsPanel(title, data, id) {
  const panel = el("div", {class: "panel", id}, el("h2", {text: title}));
  if (!data.computed) { panel.append(el("p", {class: "muted", text: data.message})); return panel; }
  return panel;
}

function effectsPanel(effects) {
  const panel = rowsPanel("effects", effects, "effects");
  if (effects.computed) {
    const columns = effects.columns.filter(c => !["layer", "polarity", "kind", "neuron", "model", "config_hash", "run_id"].includes(c));
    const shown = v => typeof v === "object" && v !== null ? JSON.stringify(v) : v;
    // one row a feature: a name / value table reads better than one wide row
    panel.append(effects.rows.length === 1 ? table(["measure", "value"], columns.map(c => [c, shown(effects.rows[0][c])]))
      : table(columns, effects.rows.map(r => columns.map(c => shown(r[c])))));
  }
  return panel;
}

function clusterPanel(cluster) {
  const panel = rowsPanel("cluster", cluster, "cluster");
  if (cluster.computed) {
    panel.append(el("p", {}, el("a", {href: cluster.page, text: `cluster ${cluster.id}`}),
      ` · ${cluster.size} members` + (cluster.label ? ` · ${cluster.label}` : "") + (cluster.coherence !== null && cluster.coherence !== undefined ? ` · coherence ${num(cluster.coherence)}` : "")));
    panel.append(el("ul", {}, cluster.members.slice(0, 12).map(m => el("li", {},
      m.page ? el("a", {href: m.page, text: featureLabel(m.kind || "neuron", m.layer, m.neuron, m.polarity)}) : "", " ", m.description || ""))));
  }
  return panel;
}

function steerPanel(f) {
  const prompt = el("textarea", {id: "steer-prompt"}, "The weather today is");
  const strength = el("input", {id: "steer-strength", type: "number", step: "any", value: "4", size: 6});
  const tokens = el("input", {id: "steer-tokens", type: "number", min: "1", max: "256", value: "16", size: 5});
  const seed = el("input", {id: "steer-seed", type: "number", value: "0", size: 5});
  const out = el("div", {id: "steer-result"});
  const button = el("button", {type: "button", id: "steer-button", text: "Steer"});
  button.addEventListener("click", async () => {
    button.disabled = true;
    out.replaceChildren(el("p", {class: "muted", text: "generating… (the first request loads the model)"}));
    const body = {prompt: prompt.value, n_tokens: Number(tokens.value), seed: Number(seed.value), strength: Number(strength.value),
      mode: "set", tokens: "both", features: [{layer: f.layer, index: f.index, polarity: f.polarity, kind: f.kind}]};
    try {
      const result = await api("/api/steer/select", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      const used = (result.features || []).map(x => `${featureLabel(x.kind, x.layer, x.index, x.polarity)} set to ${num(x.value)}`).join("; ");
      out.replaceChildren(el("p", {class: "muted", text: used}), el("div", {class: "cols"},
        el("div", {}, el("h3", {text: "baseline"}), el("div", {class: "out", id: "steer-baseline"}, el("b", {text: result.prompt}), result.baseline.text)),
        el("div", {}, el("h3", {text: "steered"}), el("div", {class: "out", id: "steer-steered"}, el("b", {text: result.prompt}), result.steered.text))));
    } catch (err) { showError(out, err); }
    button.disabled = false;
  });
  return el("div", {class: "panel steer", id: "steer"}, el("h2", {text: "steer"}),
    el("p", {class: "muted", text: "Generate from the prompt with this feature set to strength × its high quantile (q99) at every token, beside the baseline with the same seed (POST /api/steer/select; Neuronpedia's form is POST /api/steer)."}),
    prompt, el("p", {}, "strength ", strength, " tokens ", tokens, " seed ", seed, " ", button), out);
}

async function featurePage() {
  const [, , layer, polarity, index] = location.pathname.split("/");
  const kind = new URLSearchParams(location.search).get("kind") || "neuron";
  let data;
  try { data = await api(`/api/features/${layer}/${polarity}/${index}?kind=${encodeURIComponent(kind)}`); }
  catch (err) { main.replaceChildren(el("h1", {text: featureLabel(kind, layer, index, polarity)})); const p = el("div"); main.append(p); showError(p, err); return; }
  const f = data.feature;
  document.title = `${f.label} · neuron_assets explorer`;
  const d = data.description;
  const parts = [el("h1", {text: featureLabel(f.kind, f.layer, f.index, f.polarity)}),
    el("p", {}, el("a", {href: `/layers/${f.layer}/${f.polarity}` + (f.kind === "neuron" ? "" : `?kind=${f.kind}`), text: `layer ${f.layer} ${f.polarity}`}),
      ...data.other_polarities.flatMap(o => [" · ", el("a", {href: o.page, text: `${o.polarity} polarity`})]))];
  if (d) {
    parts.push(el("p", {class: "desc", id: "description", text: d.description || ""}),
      el("p", {text: `selected by ${d.scorer}${d.simulator ? " (" + d.simulator + ")" : ""} on val among ${d.n_candidates ?? "?"} candidates: ` +
        `val ${num(d.val_score)}, test ${num(d.test_score)}; shuffled control val ${num(d.control_val_score)}, test ${num(d.control_test_score)}`}));
  } else parts.push(el("p", {class: "muted", text: "no description selected yet (materialize neuron_descriptions)"}));
  for (const sentence of Object.values(data.validity)) parts.push(el("p", {class: "muted", text: sentence}));
  parts.push(el("h2", {text: "candidates, every score, and the shuffled control"}), scoresTable(data));
  parts.push(el("div", {class: "cols"},
    el("div", {}, el("h2", {text: "statistics (train)"}), el("p", {id: "stats", text: data.stats.summary}),
      el("h3", {text: "output tokens (logit lens)"}),
      data.output_tokens.length ? el("p", {class: "tokens"}, data.output_tokens.map(t => el("code", {text: JSON.stringify(t)}))) : el("p", {class: "muted", text: "none stored"})),
    el("div", {}, el("h2", {text: "activation histogram (train)"}), histogram(data.histogram, data.color))));
  parts.push(el("h2", {text: "exemplars (tokens shaded by activation / the feature's scale)"}), exemplarBlock(data));
  parts.push(effectsPanel(data.effects), clusterPanel(data.cluster), steerPanel(f));
  main.replaceChildren(...parts);
}

/* -- overviews -------------------------------------------------------------------------------- */

async function layersPage() {
  try {
    const data = await api("/api/layers");
    if (!data.described) { main.replaceChildren(el("h1", {text: "Layers"}), el("p", {class: "muted", text: data.message})); return; }
    main.replaceChildren(el("h1", {text: "Layers"}), table(
      ["layer", "polarity", "kind", "features", "scorer", "mean test", "median test", "mean control test", "above control", "flagged"],
      data.layers.map(r => [el("a", {href: r.page, text: `layer ${r.layer} ${r.polarity}`}), r.polarity, r.kind, r.neurons,
        r.scorer + (r.simulator ? ` (${r.simulator})` : ""), r.mean_test_score, r.median_test_score, r.mean_control_test_score,
        r.share_above_control, r.flagged])));
  } catch (err) { showError(main, err); }
}

async function layerPage() {
  const [, , layer, polarity] = location.pathname.split("/");
  const params = new URLSearchParams(location.search);
  const kind = params.get("kind") || "neuron", page = Number(params.get("page") || "1");
  try {
    const data = await api(`/api/layers/${layer}/${polarity}?kind=${encodeURIComponent(kind)}&page=${page}&size=50`);
    const pager = el("div", {class: "pager"});
    const go = p => { const next = new URLSearchParams(params); next.set("page", String(p)); return "?" + next.toString(); };
    if (page > 1) pager.append(el("a", {href: go(page - 1), text: "← previous"}));
    pager.append(el("span", {text: `page ${page} of ${Math.max(1, Math.ceil(data.total / data.size))}`}));
    if (page * data.size < data.total) pager.append(el("a", {href: go(page + 1), text: "next →"}));
    main.replaceChildren(el("h1", {text: `Layer ${layer} ${polarity} (${kind})`}),
      el("p", {class: "muted", text: `${data.total} described features, best test score first`}),
      table(["feature", "description", "val", "test", "control test", "candidates"],
        data.features.map(r => [el("a", {href: r.page, text: String(r.neuron)}), r.description, r.val_score, r.test_score, r.control_test_score, r.n_candidates])),
      pager);
  } catch (err) { showError(main, err); }
}

async function clustersPage() {
  try {
    const data = await api("/api/clusters");
    if (!data.computed) { main.replaceChildren(el("h1", {text: "Clusters"}), el("p", {class: "muted", id: "not-computed", text: data.message})); return; }
    main.replaceChildren(el("h1", {text: "Clusters of descriptions"}), table(["cluster", "members", "label", "coherence"],
      data.clusters.map(c => [el("a", {href: c.page, text: String(c.id)}), c.size, c.label ?? "-", c.coherence ?? null])));
  } catch (err) { showError(main, err); }
}

async function clusterPage() {
  const id = decodeURIComponent(location.pathname.split("/")[2]);
  try {
    const data = await api(`/api/clusters/${encodeURIComponent(id)}`);
    main.replaceChildren(el("h1", {text: `Cluster ${data.id}` + (data.label ? `: ${data.label}` : "")}),
      el("p", {class: "muted", text: `${data.size} members` + (data.coherence !== null && data.coherence !== undefined ? `, coherence ${num(data.coherence)}` : "")}),
      table(["feature", "description"], data.members.map(m => [
        m.page ? el("a", {href: m.page, text: featureLabel(m.kind || "neuron", m.layer, m.neuron, m.polarity)}) : "-", m.description ?? "-"])));
  } catch (err) { showError(main, err); }
}

const pages = {index: searchPage, feature: featurePage, layers: layersPage, layer: layerPage, clusters: clustersPage, cluster: clusterPage};
(pages[document.body.dataset.page] || searchPage)();
