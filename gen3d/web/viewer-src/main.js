// The report's mesh viewer: three.js, its GLTFLoader and OrbitControls, bundled into one classic
// script (viewer.js) because Chromium refuses ES-module files and fetch() on file:// pages.
// Rebuild with gen3d/web/viewer-src/build.sh.
import {
  AmbientLight, Box3, Color, DirectionalLight, MeshBasicMaterial, PerspectiveCamera, SRGBColorSpace,
  Scene, Vector3, WebGLRenderer,
} from 'three';
import { GLTFLoader } from 'three/examples/jsm/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/examples/jsm/controls/OrbitControls.js';

function bytesOf(base64) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(base64).buffer;  // native: several times faster
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes.buffer;
}

// Frame the object as the turntable does: from the front (+x), a little above, the whole box in view.
function frame(camera, controls, object) {
  const box = new Box3().setFromObject(object);
  const centre = box.getCenter(new Vector3());
  const radius = box.getSize(new Vector3()).length() / 2 || 1;
  const distance = radius / Math.sin((camera.fov * Math.PI) / 360) * 1.1;
  const elevation = (25 * Math.PI) / 180, azimuth = (30 * Math.PI) / 180;
  camera.position.set(Math.cos(elevation) * Math.cos(azimuth), Math.sin(elevation),
    Math.cos(elevation) * Math.sin(azimuth)).multiplyScalar(distance).add(centre);
  camera.near = distance / 100;
  camera.far = distance * 100;
  camera.updateProjectionMatrix();
  controls.target.copy(centre);
  controls.update();
}

// Shows the GLB (base64) on the canvas; the canvas's data-state becomes "ready" once it is drawn,
// or "error" with the reason in its title. `lit` toggles between the baked colours as they are
// and the same colours under a light that follows the camera (shape cues for pale objects).
function show(canvas, base64) {
  let renderer;
  try {
    renderer = new WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
  } catch (err) {
    canvas.dataset.state = 'no-webgl';
    canvas.title = 'this browser has no WebGL: see the turntable below';
    console.warn('gen3d viewer: ' + err.message);
    return;
  }
  renderer.outputColorSpace = SRGBColorSpace;
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  const scene = new Scene();
  scene.background = new Color(0xf4f4f4);
  const camera = new PerspectiveCamera(40, 1, 0.01, 100);
  const light = new DirectionalLight(0xffffff, 2.0);
  camera.add(light);
  scene.add(camera, new AmbientLight(0xffffff, 1.2));
  const controls = new OrbitControls(camera, canvas);
  const meshes = [];
  const draw = () => {
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * renderer.getPixelRatio())) renderer.setSize(w, h, false);
    camera.aspect = w / Math.max(h, 1);
    camera.updateProjectionMatrix();
    renderer.render(scene, camera);
  };
  controls.addEventListener('change', draw);
  window.addEventListener('resize', draw);
  const setLit = (lit) => {
    for (const mesh of meshes) mesh.material = lit ? mesh.userData.lit : mesh.userData.unlit;
    draw();
  };
  new GLTFLoader().parse(bytesOf(base64), '', (gltf) => {
    gltf.scene.traverse((node) => {
      if (!node.isMesh) return;
      if (!node.geometry.attributes.normal) node.geometry.computeVertexNormals();  // for the lit view
      node.userData.lit = node.material;
      // Unlit shows what training saw: the texture (or the vertex colours) as they are, no shading.
      node.userData.unlit = new MeshBasicMaterial({ vertexColors: node.material.vertexColors,
        color: node.material.color, map: node.material.map });
      meshes.push(node);
    });
    scene.add(gltf.scene);
    frame(camera, controls, gltf.scene);
    setLit(false);
    canvas.dataset.state = 'ready';
  }, (err) => {
    canvas.dataset.state = 'error';
    canvas.title = String(err && err.message || err);
    console.error('gen3d viewer: the mesh could not be read: ' + canvas.title);
  });
  return { setLit };
}

window.gen3dViewer = { show };
