// XSR frontend helpers shared by web/xsr.js (gallery, caption) and web/xsr_tiles.js (tile grid).
// ComfyUI's frontend imports every .js file of the pack's web directory as a module: this one only exports
// functions and registers no extension. Text is set with textContent only, image URLs are built with
// URLSearchParams (names and captions come from the reference DB and a model).
import { api } from "../../scripts/api.js";

const OVERLAY_STYLE_ID = "xsr-overlay-style";
const OVERLAY_CSS = `
.xsr-overlay { position: fixed; inset: 0; z-index: 10000; background: rgba(0, 0, 0, 0.85); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 8px; cursor: zoom-out; }
.xsr-overlay img { max-width: 90vw; max-height: 85vh; image-rendering: auto; object-fit: contain; }
.xsr-overlay-caption { color: #eee; font: 14px sans-serif; max-width: 90vw; text-align: center; }
`;

export function ensureStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = document.createElement("style");
  style.id = id;
  style.textContent = css;
  document.head.appendChild(style);
}

export function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

export function viewURL(image) {
  const params = new URLSearchParams({
    filename: String(image?.filename ?? ""),
    subfolder: String(image?.subfolder ?? ""),
    type: String(image?.type ?? "temp"),
  });
  return api.apiURL("/view?" + params.toString());
}

export function formatScore(score) {
  const s = Number(score);
  return Number.isFinite(s) ? s.toFixed(3) : "?";
}

// ---- overlay: one image at full size with its label; a click or Escape closes it -----------------
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

export function openOverlay(src, text) {
  closeOverlay();
  ensureStyle(OVERLAY_STYLE_ID, OVERLAY_CSS);
  const overlay = el("div", "xsr-overlay");
  overlay.setAttribute("role", "dialog");
  overlay.setAttribute("aria-label", "XSR reference");
  const img = el("img");
  img.alt = text;
  const caption = el("div", "xsr-overlay-caption", text);
  img.addEventListener("load", () => { caption.textContent = `${text}  (${img.naturalWidth}x${img.naturalHeight})`; }, { once: true });
  img.src = src;
  overlay.append(img, caption);
  overlay.addEventListener("click", closeOverlay);
  document.addEventListener("keydown", onOverlayKey, true);
  document.body.appendChild(overlay);
}

// ---- DOM widgets ---------------------------------------------------------------------------------
// The node's display-only DOM widget `name` (added on first use): never serialized, wheel/drag on it
// does not move the canvas.
export function getOrAddWidget(node, name, className, minHeight) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (widget) return widget;
  const container = el("div", className);
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

// Grow the node to fit its widgets (never shrink what the user sized).
export function fitNode(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

// Call fn(node, output) after the node type's own onExecuted; an error there is logged, never thrown
// into the frontend's execution handling.
export function hookExecuted(nodeType, fn) {
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
