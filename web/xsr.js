// XSR frontend extension (ComfyUI frontend >= 1.32): shows on the nodes what XSR retrieved and wrote.
//  - XSR_Retrieve: a gallery of the K references per LR image with their similarity scores and source
//    names (ui "xsr_refs" + the preview "images"); click a thumbnail to enlarge it in an overlay.
//  - XSR_Enhance: the caption used as the prompt (ui "text").
// Captions and file names are untrusted (they come from a model and from the reference DB): every
// piece of text is set with textContent, never innerHTML; image URLs are built with URLSearchParams.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const GALLERY_WIDGET = "xsr_gallery";
const CAPTION_WIDGET = "xsr_caption";
const STYLE_ID = "xsr-gallery-style";

const CSS = `
.xsr-gallery { display: flex; flex-direction: column; gap: 6px; overflow: auto; font: 11px sans-serif;
  color: var(--input-text, #ddd); box-sizing: border-box; padding: 2px; }
.xsr-gallery-row { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)); gap: 4px; }
.xsr-gallery-label { opacity: 0.7; }
.xsr-ref { margin: 0; cursor: zoom-in; display: flex; flex-direction: column; min-width: 0; }
.xsr-ref img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 3px; background: #222; }
.xsr-ref figcaption { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.xsr-ref-score { font-weight: bold; }
.xsr-caption { white-space: pre-wrap; overflow: auto; font: 12px sans-serif; padding: 4px; box-sizing: border-box;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); border-radius: 4px; user-select: text; }
.xsr-overlay { position: fixed; inset: 0; z-index: 10000; background: rgba(0, 0, 0, 0.85); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 8px; cursor: zoom-out; }
.xsr-overlay img { max-width: 90vw; max-height: 85vh; image-rendering: auto; }
.xsr-overlay-caption { color: #eee; font: 14px sans-serif; max-width: 90vw; text-align: center; }
`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function viewURL(image) {
  const params = new URLSearchParams({
    filename: String(image?.filename ?? ""),
    subfolder: String(image?.subfolder ?? ""),
    type: String(image?.type ?? "temp"),
  });
  return api.apiURL("/view?" + params.toString());
}

function formatScore(score) {
  const s = Number(score);
  return Number.isFinite(s) ? s.toFixed(3) : "?";
}

// ---- overlay -------------------------------------------------------------------------------------
function closeOverlay() {
  document.querySelector(".xsr-overlay")?.remove();
  document.removeEventListener("keydown", onOverlayKey, true);
}

function onOverlayKey(e) {
  if (e.key === "Escape") {
    e.stopPropagation();
    closeOverlay();
  }
}

function openOverlay(src, text) {
  closeOverlay();
  const overlay = el("div", "xsr-overlay");
  overlay.setAttribute("role", "dialog");
  overlay.setAttribute("aria-label", "XSR reference");
  const img = el("img");
  img.src = src;
  img.alt = text;
  overlay.append(img, el("div", "xsr-overlay-caption", text));
  overlay.addEventListener("click", closeOverlay);
  document.addEventListener("keydown", onOverlayKey, true);
  document.body.appendChild(overlay);
}

// ---- DOM widgets ---------------------------------------------------------------------------------
function getOrAddWidget(node, name, className, minHeight) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (widget) return widget;
  ensureStyle();
  const container = el("div", className);
  // keep wheel/drag on the gallery from moving the canvas
  container.addEventListener("wheel", (e) => e.stopPropagation(), { passive: true });
  widget = node.addDOMWidget(name, name, container, {
    serialize: false,
    hideOnZoom: false,
    getValue() {
      return undefined;
    },
    setValue() {},
    getMinHeight: () => minHeight,
  });
  widget.serialize = false; // not a node input: never part of widgets_values
  return widget;
}

function fitNode(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

function showGallery(node, output) {
  const refs = Array.isArray(output?.xsr_refs) ? output.xsr_refs : [];
  const images = Array.isArray(output?.images) ? output.images : [];
  const rows = new Map(); // LR image index -> its references
  refs.forEach((ref, i) => {
    const key = Number.isInteger(ref?.image) ? ref.image : 0;
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push({ ref, image: images[i] });
  });
  const height = Math.min(110 * Math.max(rows.size, 1) + 10, 460);
  const widget = getOrAddWidget(node, GALLERY_WIDGET, "xsr-gallery", height);
  const box = widget.element;
  box.replaceChildren();
  if (!refs.length) {
    box.appendChild(el("div", "xsr-gallery-label", "no references"));
  }
  for (const [lr, items] of [...rows.entries()].sort((a, b) => a[0] - b[0])) {
    if (rows.size > 1) box.appendChild(el("div", "xsr-gallery-label", `LR image ${lr + 1}`));
    const row = el("div", "xsr-gallery-row");
    for (const { ref, image } of items) {
      const rank = Number.isInteger(ref.rank) ? ref.rank + 1 : "?";
      const name = String(ref.name ?? "");
      const fig = el("figure", "xsr-ref");
      fig.title = `#${rank}  score ${formatScore(ref.score)}\n${name}`;
      const img = el("img");
      img.alt = name;
      img.loading = "lazy";
      if (image) img.src = viewURL(image);
      const cap = el("figcaption");
      cap.append(el("span", "xsr-ref-score", `#${rank} ${formatScore(ref.score)}`), el("br"),
                 el("span", "xsr-ref-name", name));
      fig.append(img, cap);
      fig.addEventListener("click", (e) => {
        e.stopPropagation();
        if (image) openOverlay(viewURL(image), `#${rank}  score ${formatScore(ref.score)}  ${name}`);
      });
      row.appendChild(fig);
    }
    box.appendChild(row);
  }
  fitNode(node);
}

function showCaption(node, output) {
  const lines = Array.isArray(output?.text) ? output.text.map((t) => String(t ?? "")) : [];
  const widget = getOrAddWidget(node, CAPTION_WIDGET, "xsr-caption", 60);
  widget.element.textContent = lines.join("\n");
  fitNode(node);
}

function hookExecuted(nodeType, fn) {
  const orig = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    const r = orig?.apply(this, arguments);
    try {
      fn(this, output);
    } catch (e) {
      console.warn("[xsr] could not show the node's result:", e);
    }
    return r;
  };
}

app.registerExtension({
  name: "xsr.gallery",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === "XSR_Retrieve") hookExecuted(nodeType, showGallery);
    else if (nodeData?.name === "XSR_Enhance") hookExecuted(nodeType, showCaption);
  },
});
