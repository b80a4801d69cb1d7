// XSR tiled x16: per-tile references on the XSR_TilePreview node (helpers shared with web/xsr.js in web/xsr_dom.js).
//  - a grid laid out like the LR's tiles, each cell showing the tile's top reference and its score;
//  - click a cell: all references of that tile (rank, score, source name) and the tile's caption;
//    click a reference there to see it large. The caption(s) are listed under the grid.
// Message (ui of XSR_TilePreview): "xsr_tile_images" (reference thumbnails, flat; not "images", which
// the frontend would preview itself) and "xsr_tiles":
//   [{tiling: {lr_width, lr_height, rows, cols, boxes: [[x, y, w, h]...]},
//     tiles: [{refs: [{index, rank, score, name}]}], captions: [one per tile | one | none]}]
// Names and captions come from the reference DB and a model: text is set with textContent only.
import { app } from "../../scripts/app.js";
import { el, ensureStyle, fitNode, formatScore as fmt, getOrAddWidget, hookExecuted, openOverlay, viewURL } from "./xsr_dom.js";

const WIDGET = "xsr_tiles";
const STYLE_ID = "xsr-tiles-style";
const CSS = `
.xsr-tiles { display: flex; flex-direction: column; gap: 6px; overflow: auto; box-sizing: border-box; padding: 2px;
  font: 11px sans-serif; color: var(--input-text, #ddd); }
.xsr-tiles-grid { position: relative; width: 100%; background: #111; border-radius: 3px; }
.xsr-tile { position: absolute; box-sizing: border-box; border: 1px solid rgba(255, 255, 255, 0.35); cursor: pointer;
  overflow: hidden; }
.xsr-tile img { width: 100%; height: 100%; object-fit: cover; display: block; opacity: 0.92; }
.xsr-tile span { position: absolute; left: 1px; bottom: 1px; background: rgba(0, 0, 0, 0.6); padding: 0 2px; }
.xsr-tile.xsr-selected { border: 2px solid #4af; z-index: 2; }
.xsr-tile-detail { display: flex; flex-direction: column; gap: 4px; }
.xsr-tile-refs { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)); gap: 4px; }
.xsr-tile-refs figure { margin: 0; cursor: zoom-in; min-width: 0; }
.xsr-tile-refs img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 3px; background: #222; }
.xsr-tile-refs figcaption { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.xsr-tile-caption { white-space: pre-wrap; user-select: text; background: var(--comfy-input-bg, #222);
  border-radius: 4px; padding: 4px; font-size: 12px; }
`;

function getWidget(node) {
  ensureStyle(STYLE_ID, CSS);
  return getOrAddWidget(node, WIDGET, "xsr-tiles", 320);
}

function captionOf(info, i) {
  const caps = Array.isArray(info?.captions) ? info.captions : [];
  if (caps.length === 1) return String(caps[0] ?? "");
  return caps.length > i ? String(caps[i] ?? "") : "";
}

function showDetail(detail, info, images, i) {
  detail.replaceChildren();
  const tile = info.tiles?.[i];
  const box = info.tiling?.boxes?.[i] ?? [];
  detail.appendChild(el("div", "", `tile ${i + 1} of ${info.tiles?.length ?? 0}  (LR x ${box[0]}, y ${box[1]}, ${box[2]}x${box[3]} px)`));
  const row = el("div", "xsr-tile-refs");
  for (const ref of tile?.refs ?? []) {
    const image = images[ref.index];
    const label = `#${(ref.rank ?? 0) + 1} ${fmt(ref.score)} ${String(ref.name ?? "")}`;
    const fig = el("figure");
    fig.title = label;
    const img = el("img");
    img.alt = String(ref.name ?? "");
    img.loading = "lazy";
    if (image) img.src = viewURL(image);
    fig.append(img, el("figcaption", "", label));
    fig.addEventListener("click", (e) => {
      e.stopPropagation();
      if (image) openOverlay(viewURL(image), label);
    });
    row.appendChild(fig);
  }
  detail.appendChild(row);
  const cap = captionOf(info, i);
  if (cap) detail.appendChild(el("div", "xsr-tile-caption", cap));
}

function showTiles(node, output) {
  const info = Array.isArray(output?.xsr_tiles) ? output.xsr_tiles[0] : null;
  const images = Array.isArray(output?.xsr_tile_images) ? output.xsr_tile_images : [];
  const widget = getWidget(node);
  const root = widget.element;
  root.replaceChildren();
  if (!info?.tiling || !Array.isArray(info.tiles)) {
    root.appendChild(el("div", "", "no tiles"));
    return;
  }
  const { lr_width: W, lr_height: H, boxes = [] } = info.tiling;
  const grid = el("div", "xsr-tiles-grid");
  grid.style.aspectRatio = `${W} / ${H}`;
  const detail = el("div", "xsr-tile-detail");
  const cells = [];
  boxes.forEach(([x, y, w, h], i) => {
    const top = info.tiles[i]?.refs?.[0];
    const cell = el("div", "xsr-tile");
    // tiles overlap: draw each at its own place, later tiles on top, as the grid is laid out
    cell.style.left = `${(100 * x) / W}%`;
    cell.style.top = `${(100 * y) / H}%`;
    cell.style.width = `${(100 * w) / W}%`;
    cell.style.height = `${(100 * h) / H}%`;
    cell.title = top ? `tile ${i + 1}: ${String(top.name ?? "")} (${fmt(top.score)})\n${captionOf(info, i)}` : `tile ${i + 1}`;
    if (top && images[top.index]) {
      const img = el("img");
      img.alt = String(top.name ?? "");
      img.src = viewURL(images[top.index]);
      cell.appendChild(img);
    }
    cell.appendChild(el("span", "", top ? fmt(top.score) : "-"));
    cell.addEventListener("click", (e) => {
      e.stopPropagation();
      cells.forEach((c) => c.classList.remove("xsr-selected"));
      cell.classList.add("xsr-selected");
      showDetail(detail, info, images, i);
    });
    cells.push(cell);
    grid.appendChild(cell);
  });
  const caps = Array.isArray(info.captions) ? info.captions : [];
  root.append(el("div", "", `${boxes.length} tiles (${info.tiling.rows}x${info.tiling.cols}), top reference per tile; click a tile`),
              grid, detail);
  if (caps.length === 1) root.appendChild(el("div", "xsr-tile-caption", String(caps[0] ?? "")));
  if (cells.length) {
    cells[0].classList.add("xsr-selected");
    showDetail(detail, info, images, 0);
  }
  fitNode(node);
}

app.registerExtension({
  name: "xsr.tiles",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "XSR_TilePreview") return;
    hookExecuted(nodeType, showTiles);
  },
});
