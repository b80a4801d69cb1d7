// XSR frontend extension (ComfyUI frontend 1.32 ... 1.49; classic canvas and Nodes 2.0): shows on the
// nodes what XSR retrieved and wrote.
//  - XSR_Retrieve: a gallery of the K references per LR image with their similarity scores and source
//    names (ui "xsr_refs" + the thumbnails "xsr_thumbs"; not "images", which would add the stock
//    preview a second time); the full name shows on hover; click a thumbnail to see that reference at
//    its full resolution (ui "xsr_refs"[i].full) in an overlay.
//  - XSR_Enhance: the caption used as the prompt (ui "text"), in a read-only box labelled as output.
// Captions and file names are untrusted (they come from a model and from the reference DB): every
// piece of text is set with textContent, never innerHTML; image URLs are built with URLSearchParams.
import { app } from "../../scripts/app.js";
import {
  el,
  ensureStyle,
  fitNode,
  formatScore,
  getOrAddWidget,
  hookExecuted,
  openOverlay,
  viewURL,
} from "./xsr_dom.js";

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
.xsr-caption-box { display: flex; flex-direction: column; gap: 2px; box-sizing: border-box; overflow: hidden; }
.xsr-caption-label { font: 10px sans-serif; opacity: 0.7; color: var(--input-text, #ddd); }
.xsr-caption { white-space: pre-wrap; overflow: auto; flex: 1; font: 12px sans-serif; padding: 4px; box-sizing: border-box;
  color: var(--input-text, #ddd); background: transparent; border: 1px dashed var(--border-color, #555);
  border-radius: 4px; user-select: text; cursor: text; }
`;

function styledWidget(node, name, className, minHeight) {
  ensureStyle(STYLE_ID, CSS);
  return getOrAddWidget(node, name, className, minHeight);
}

function showGallery(node, output) {
  const refs = Array.isArray(output?.xsr_refs) ? output.xsr_refs : [];
  const thumbs = output?.xsr_thumbs ?? output?.images; // "images": servers of pack versions before 0.2
  const images = Array.isArray(thumbs) ? thumbs : [];
  const rows = new Map(); // LR image index -> its references
  refs.forEach((ref, i) => {
    const key = Number.isInteger(ref?.image) ? ref.image : 0;
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push({ ref, image: images[i] });
  });
  const height = Math.min(110 * Math.max(rows.size, 1) + 10, 460);
  const widget = styledWidget(node, GALLERY_WIDGET, "xsr-gallery", height);
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
      const full = ref.full && typeof ref.full === "object" ? ref.full : image;
      fig.title = `#${rank}  score ${formatScore(ref.score)}\n${name}`;
      const img = el("img");
      img.alt = name;
      img.title = name;
      img.loading = "lazy";
      if (image) img.src = viewURL(image);
      const cap = el("figcaption");
      const nameEl = el("span", "xsr-ref-name", name);
      nameEl.title = name; // shown in full on hover (the caption ellipsizes it)
      cap.append(el("span", "xsr-ref-score", `#${rank} ${formatScore(ref.score)}`), el("br"), nameEl);
      fig.append(img, cap);
      fig.addEventListener("click", (e) => {
        e.stopPropagation();
        if (full) openOverlay(viewURL(full), `#${rank}  score ${formatScore(ref.score)}  ${name}`);
      });
      row.appendChild(fig);
    }
    box.appendChild(row);
  }
  fitNode(node);
}

function showCaption(node, output) {
  const lines = Array.isArray(output?.text) ? output.text.map((t) => String(t ?? "")) : [];
  const widget = styledWidget(node, CAPTION_WIDGET, "xsr-caption-box", 76);
  const box = widget.element;
  let text = box.querySelector(".xsr-caption");
  if (!text) {
    const label = el("div", "xsr-caption-label", "caption (output: the prompt XSR used; edit caption_override to change it)");
    text = el("div", "xsr-caption");
    text.setAttribute("role", "status");
    text.setAttribute("aria-label", "XSR caption (output)");
    box.append(label, text);
  }
  text.textContent = lines.join("\n");
  fitNode(node);
}

app.registerExtension({
  name: "xsr.gallery",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === "XSR_Retrieve") hookExecuted(nodeType, showGallery);
    else if (nodeData?.name === "XSR_Enhance") hookExecuted(nodeType, showCaption);
  },
});
